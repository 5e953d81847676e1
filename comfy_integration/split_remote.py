"""The ComfyUI side of one split node: its stage actors, and the block calls that run on them.

``RemoteBlocks`` owns a ``StageGroup`` of ``ComfyBlocks`` hosts (ComfyUI's own blocks on each
stage), builds it on demand and again after a stage died for good, ships the weight patches of the
remote blocks once per set, and runs one remote chain per block call: the call's streams cut into
micro-batches, each entering the chain through ``StageGroup.submit_chain`` and coming back through
``collect`` (stage restart and step retry included).  Per-generation constants go to the object
store once, keyed by their content (``DigestMemo``: an equality check per step, no re-hash).

ComfyUI is imported only inside functions: this module runs inside a ComfyUI process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
import uuid
import weakref
from typing import Any, Callable

import ray
import torch

from mesh_ray.actors.device import dtype_name
from mesh_ray.actors.records import GenConsts, Hop
from mesh_ray.actors.stage import GENERATIONS_KEPT
from mesh_ray.actors.wire import Streams
from mesh_ray.config import SplitOptions, StageSpec
from mesh_ray.digest import DigestMemo, tensor_digest
from mesh_ray.errors import ClusterError, MeshError, StageError
from mesh_ray.mesh import Mesh
from mesh_ray.split.stages import GenerationCache, Segment, StageGroup

from .archs import Arch, Capture, Unsliceable
from .comfy_stage import ComfyBlocks, ModelSpec, read_blocks, tree_map
from .connection import live_mesh
from .plan import Layout
from .registry import record_split

PING_TIMEOUT_S = 10.0
ROOM_WAIT_S = 15.0  # how long a new split waits for resources that closed stages are still giving back

# Split node id -> its RemoteBlocks, while a MODEL that uses them lives (ComfyUI's cache, a later
# node's clone): when the last one goes, so do the stages (``RemoteBlocks``' finalizer).
_live: "weakref.WeakValueDictionary[str, RemoteBlocks]" = weakref.WeakValueDictionary()
_live_lock = threading.Lock()


def live(key: str) -> "RemoteBlocks | None":
    """The RemoteBlocks of split node ``key``, if a MODEL still uses them."""
    with _live_lock:
        return _live.get(key)


def remember(remote: "RemoteBlocks") -> None:
    with _live_lock:
        _live[remote.key] = remote


def close_all_splits() -> int:
    """Close the stages of every split node of this process (benchmarks, shutdown); how many there were."""
    with _live_lock:
        remotes = list(_live.values())
        _live.clear()
    for remote in remotes:
        remote.close()
    return len(remotes)


def check_room(key: str, group: StageGroup, wait_s: float = ROOM_WAIT_S) -> None:
    """A one-line ClusterError, before any actor starts, when the cluster lacks the CPUs/GPUs that
    ``group``'s stages ask for (naming the other split nodes holding stages), instead of a start
    that waits ``start_timeout_s`` for room that never comes."""
    need: dict[str, float] = {}
    for seg in group.remote:
        for name, v in (("CPU", seg.spec.num_cpus), ("GPU", group.num_gpus(seg.spec))):
            need[name] = need.get(name, 0.0) + v
    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources()
        short = {k: v for k, v in need.items() if v and free.get(k, 0.0) < v - 1e-9}
        if not short or time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # stages closed a moment ago may still be giving their resources back
    if short:
        with _live_lock:
            others = sorted(k for k, r in _live.items() if k != key and r.group is not None and not r.group.closed)
        held = (f"; split node{'s' if len(others) > 1 else ''} {', '.join(others)} "
                f"hold{'' if len(others) > 1 else 's'} stages") if others else ""
        what = ", ".join(f"{k}={v:g} (free {free.get(k, 0.0):g} of {ray.cluster_resources().get(k, 0.0):g})"
                         for k, v in short.items())
        raise ClusterError(f"split node {key} needs {len(group.remote)} stages with {what}{held}: the cluster is too "
                           f"small for them; use fewer stages, remove a split node, or add a node to the cluster")


def leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) of a nested value, for content keys."""
    if isinstance(value, (list, tuple)):
        return [x for i, v in enumerate(value) for x in leaves(v, f"{path}.{i}")]
    if isinstance(value, dict):
        return [x for k, v in sorted(value.items()) for x in leaves(v, f"{path}.{k}")]
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return [(path, value)]
    if callable(value):
        return [(path, repr(value))]
    if hasattr(value, "__dict__") or hasattr(type(value), "__slots__"):
        names = getattr(type(value), "__slots__", None) or sorted(vars(value))
        return [(f"{path}:{type(value).__name__}", None)] + [x for n in names if n != "__weakref__"
                                                             for x in leaves(getattr(value, n, None), f"{path}.{n}")]
    return [(path, repr(value))]


def _tensor_key(t: torch.Tensor) -> str:
    return tensor_digest([("t", t)], 12)


class RemoteBlocks:
    """The stage actors of one split node (``key``: ComfyUI's node id) and its remote block calls."""

    def __init__(self, key: str, mesh: Mesh, arch: Arch, spec: ModelSpec, layout: Layout, specs: list[StageSpec],
                 options: SplitOptions, checkpoint: str | None, memory_shard: Callable[[tuple[str, ...]], dict],
                 weights_id: Any, address: str, plan: str, actor_options: dict | None = None):
        self.key, self.mesh, self.arch, self.spec, self.layout = key, mesh, arch, spec, layout
        self.specs, self.options, self.checkpoint = specs, options, checkpoint
        self.memory_shard, self.weights_id = memory_shard, weights_id
        self.address, self.plan = address, plan
        self.actor_options = actor_options or {}  # more Ray options for the stage actors (e.g. a runtime_env)
        self._box: list[StageGroup | None] = [None]
        weakref.finalize(self, _close_box, self._box)  # the last MODEL using these stages is gone: close them
        self.builds = 0
        self.patch_digest: str | None = None  # the weight-patch set on the stages
        self.patch_ships = 0
        self._patches: tuple[dict, str | None] = ({}, None)
        self.last_hops: list[Hop] = []
        self._gens = GenerationCache(max(GENERATIONS_KEPT, 4 * options.micro_batches))
        self._memos: dict[tuple, DigestMemo] = {}
        self._lock = threading.RLock()
        self.wire_dtype = getattr(torch, options.dtype or "float32")

    # -- the stages ------------------------------------------------------------------------------

    @property
    def group(self) -> StageGroup | None:
        return self._box[0]

    @group.setter
    def group(self, group: StageGroup | None) -> None:
        self._box[0] = group

    def same_build(self, spec: ModelSpec, specs: list[StageSpec], options: SplitOptions, checkpoint: str | None,
                   weights_id: Any) -> bool:
        """Whether these stages already hold this model and plan (a patch change, or another micro-batch
        count, then needs no restart)."""
        def stages_of(o: SplitOptions) -> SplitOptions:
            return o.model_copy(update={"micro_batches": 1})  # only the ComfyUI process cuts the batch

        return (self.spec, self.specs, stages_of(self.options), self.checkpoint, self.weights_id) == (
            spec, specs, stages_of(options), checkpoint, weights_id)

    def ensure(self) -> StageGroup:
        """The live stages, created now if there are none (first use, closed, or after a death)."""
        with self._lock:
            self._follow_cluster()
            if self.group is None or self.group.closed:
                self._build()
            return self.group

    def _follow_cluster(self) -> None:
        """Move to the process's new connection when the cluster went away and came back; while it is
        down, a one-line ClusterError (and a red light) instead of a call that Ray would hang or abort."""
        try:
            mesh = live_mesh(self.mesh)
        except MeshError as e:
            record_split(self.key, None, self.address, self.plan, str(e))
            raise
        if mesh is not self.mesh:  # the old stages went with the old cluster: nothing to close there
            self.mesh, self.group, self.patch_digest = mesh, None, None
            self._gens.clear()  # object-store entries of the old session
            source = self.spec.source
            if source is not None and source.package:  # a shipped ComfyUI: put into the new session
                self.spec = dataclasses.replace(self.spec, source=dataclasses.replace(source, package=()).for_actors())

    def _segments(self) -> list[Segment]:
        return [Segment(self.layout.parse(s.blocks), s, index=i) for i, s in enumerate(self.specs)]

    def _build(self) -> None:
        import comfy.model_management

        # The group's callbacks hold what they need, not this object: the status registry keeps the
        # group, and this object must go when the last MODEL using it does.
        spec, layout, checkpoint, memory = self.spec, self.layout, self.checkpoint, self.memory_shard

        def host(seg: Segment) -> ComfyBlocks:
            blocks = tuple((kind, i) for kind, _, i in (layout.locate(b) for b in seg.range))
            return ComfyBlocks(seg.index, spec, blocks, str(seg.range))

        def shard(seg: Segment) -> dict[str, torch.Tensor]:
            prefixes = layout.prefixes(seg.range)
            return read_blocks(checkpoint, spec, prefixes) if checkpoint else memory(prefixes)

        group = StageGroup(f"comfy-{self.key}-{uuid.uuid4().hex[:6]}", self._segments(), self.options, host, shard,
                           checkpoint, comfy.model_management.get_torch_device(), self.wire_dtype)
        try:
            check_room(self.key, group)
            group.start(self.actor_options)
        except MeshError as e:
            record_split(self.key, None, self.address, self.plan, str(e))
            raise
        self.group, self.patch_digest = group, None  # fresh stages hold the base weights
        self.builds += 1
        record_split(self.key, group, self.address, self.plan)

    def alive(self, timeout_s: float = PING_TIMEOUT_S) -> bool:
        """Whether every stage actor answers."""
        group = self.group
        if group is None or group.closed:
            return False
        try:
            ray.get([s.actor.ready.remote() for s in group.remote], timeout=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - RayActorError, timeouts: a stage is gone
            return False

    def close(self) -> None:
        with self._lock:
            if self.group is not None:
                self.group.close()
            self._gens.clear()

    # -- weight patches --------------------------------------------------------------------------

    def set_patches(self, entries: dict[str, list], digest: str | None) -> None:
        """The remote blocks' weight patches (ComfyUI ``ModelPatcher.patches`` entries) to keep on the stages."""
        self._patches = (entries, digest)

    def use_patches(self) -> None:
        """Put the patch set on the stages unless it is there already (shipped once per set)."""
        entries, digest = self._patches
        with self._lock:
            group = self.ensure()
            if self.patch_digest != digest:
                prefixes = {seg.index: self.layout.prefixes(seg.range) for seg in group.remote}
                group.send_patches(lambda seg: {k: v for k, v in entries.items()
                                                if k.removeprefix("diffusion_model.").startswith(prefixes[seg.index])},
                                   digest)
                self.patch_digest = digest
                self.patch_ships += 1

    # -- a block call ----------------------------------------------------------------------------

    def run_chain(self, chain_no: int, cap: Capture, device: torch.device) -> dict[str, torch.Tensor]:
        """Run remote chain ``chain_no`` on ``cap`` (a stage that died for good: the stages are created
        again once and the call repeated)."""
        try:
            return self._run_chain(chain_no, cap, device)
        except StageError:
            with self._lock:
                if self.alive():
                    raise
                self.close()
                self.group = None
            return self._run_chain(chain_no, cap, device)

    def _run_chain(self, chain_no: int, cap: Capture, device: torch.device) -> dict[str, torch.Tensor]:
        self.use_patches()  # a stage that restarts gets them again from its group before the step is retried
        group = self.group
        return self._submit(group, group.chains()[chain_no], cap, device)

    def _pieces(self, cap: Capture) -> list[Capture]:
        first = next(iter(cap.streams.values()))
        batch = first.shape[0]
        n = min(self.options.micro_batches, batch)
        if n == 1:
            return [cap]
        bounds = [round(i * batch / n) for i in range(n + 1)]
        try:
            return [Capture(*(self.arch.cut(part, slice(bounds[i], bounds[i + 1]), batch)
                              for part in (cap.streams, cap.step, cap.consts))) for i in range(n)]
        except Unsliceable:  # e.g. a value with twice the batch (timestep-zero modulation): one piece
            return [cap]

    def _submit(self, group: StageGroup, chain: list[Segment], cap: Capture, device: torch.device) -> dict:
        refs = []
        for j, piece in enumerate(self._pieces(cap)):
            gen = self._gen(j, piece.consts)
            dtypes = {k: dtype_name(v.dtype) for k, v in piece.streams.items()}
            step = tree_map(lambda t: t.detach().cpu(), piece.step)
            # submitted without waiting: micro-batch j+1 enters the chain while j moves on
            refs.append(group.submit_chain(chain, Streams(dict(piece.streams), {"dtypes": dtypes}), step, gen))
        outs, hops = [], []
        for ref in refs:
            streams, h = group.collect(ref, chain[-1], device, self.wire_dtype, "a remote block range")
            dtypes = streams.meta.get("dtypes", {})
            outs.append({k: v.to(getattr(torch, dtypes.get(k, "float32"))) for k, v in streams.tensors.items()})
            hops.extend(h)
        self.last_hops = hops
        if len(outs) == 1:
            return outs[0]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def _gen(self, piece: int, consts: dict[str, Any]) -> GenConsts:
        """The generation's constants of micro-batch ``piece`` in the object store, once per content."""
        h = hashlib.blake2b(digest_size=12)
        for path, leaf in leaves(consts):
            if isinstance(leaf, torch.Tensor):
                memo = self._memos.setdefault((piece, path), DigestMemo(_tensor_key, keep=2))
                leaf = memo(leaf)
            h.update(f"{path}={leaf!r};".encode())
        key = f"comfy:{h.hexdigest()}"
        return self._gens.remember(key, lambda: GenConsts(
            key, {name: [ray.put(tree_map(lambda t: t.detach().cpu(), v))] for name, v in consts.items()}))


def _close_box(box: list) -> None:
    if box[0] is not None:
        box[0].close()


__all__ = ["PING_TIMEOUT_S", "RemoteBlocks", "check_room", "close_all_splits", "leaves", "live", "remember"]
