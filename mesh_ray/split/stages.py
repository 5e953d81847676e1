"""The stage actors of a split, whatever blocks they host: start, load, links, one submit path, recovery.

``StageGroup`` owns what every split has in common: placing one stage actor per remote segment
(each with its ``BlockHost``: mesh-ray's own FLUX in ``SplitModel``, ComfyUI's own blocks in the
ComfyUI bridge), loading its weights (its node's file, the node's shard cache, or shipped once),
planning each link from where its two ends run (codec and transport: ``split/transport.py``), the
one place a step enters a chain of stages (``submit_chain``, which applies each link's transport),
waiting for it with stage restart, group re-creation and step retry (``collect``, through
``split/recovery.py``), and closing.  What the streams, the step's conditioning and the
per-generation constants are is the host's business; this module moves them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

import ray
import torch
from ray.exceptions import GetTimeoutError

from mesh_ray.actors.cuda_ipc import gpu_uuid, visible_gpus
from mesh_ray.actors.device import DTYPES, dtype_name, narrower
from mesh_ray.actors.host import BlockHost
from mesh_ray.actors.records import GenConsts, Hop, LinkPlan
from mesh_ray.actors.shards import default_cache_dir, send_shard
from mesh_ray.actors.stage import DirectStageActor, StageActor, StageInit
from mesh_ray.actors.wire import Streams, pack, unpack
from mesh_ray.cluster import rdt_internals
from mesh_ray.cluster.ray_errors import ray_error
from mesh_ray.cluster.resources import default_num_gpus, explain_unschedulable, node_affinity
from mesh_ray.codec import choose_spec
from mesh_ray.config import SplitOptions, StageSpec
from mesh_ray.errors import ClusterError, MeshError, StageError
from mesh_ray.split.links import DIRECT, Endpoint
from mesh_ray.split.recovery import ChainCall, Recovery
from mesh_ray.split.transport import Link, Transports, ray_name

log = logging.getLogger("mesh_ray.split.stages")


@dataclass
class Segment:
    """A block range and who runs it: ``actor`` None means the calling process."""

    range: Any  # how the blocks are named for people (str() of it): a BlockRange, or a host's own range
    spec: StageSpec
    actor: Any = None
    index: int = -1
    node_id: str | None = None
    dtype: torch.dtype | None = None  # what it computes in (a stage reports its own)
    device: str = "cpu"  # "cpu" or "cuda" (a stage reports its own)
    gpu: str | None = None  # the UUID of its GPU
    nccl: bool = False  # Ray's NCCL groups can run in its process
    in_plan: LinkPlan | None = None  # the link into this stage
    out_plan: LinkPlan | None = None  # the link out of it, which the stage codes

    def endpoint(self) -> Endpoint:
        """This stage as one end of a link (``split/links.py``)."""
        return Endpoint(f"stage{self.index}", self.node_id or "", self.device, self.gpu, self.nccl)


class GenerationCache:
    """Per-generation constants the caller put in the object store, by key, least recently used
    dropped beyond ``kept`` (which releases their object-store entries)."""

    def __init__(self, kept: int):
        self.kept = kept
        self._items: OrderedDict[str, Any] = OrderedDict()

    def remember(self, key: str, make: Callable[[], Any]) -> Any:
        """The item cached under ``key`` (``make()`` on a miss)."""
        if key not in self._items:
            self._items[key] = make()
            while len(self._items) > self.kept:
                self._items.popitem(last=False)
        self._items.move_to_end(key)
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


def put_consts(key: str, consts: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> GenConsts:
    """Per-generation constants in the object store once, as the record stages fetch them from."""
    return GenConsts(key, {name: [ray.put(t.detach().cpu())] for name, t in consts.items()}, grid)


class StageGroup:
    """The stage actors for the remote ``segments`` of a split (see the module docstring).

    ``host_for(seg)`` gives the ``BlockHost`` a segment's actor runs; ``shard_for(seg)`` the tensors
    to ship to a stage whose node cannot read ``checkpoint`` (None: always shipped);
    ``caller_device`` / ``caller_dtype``: where the calling process computes (its end of the first and
    last links; a CPU caller's torch thread count is the CPU stages' default, for exactness).
    """

    def __init__(self, name: str, segments: list[Segment], options: SplitOptions,
                 host_for: Callable[[Segment], BlockHost], shard_for: Callable[[Segment], dict[str, torch.Tensor]],
                 checkpoint: str | None, caller_device: torch.device, caller_dtype: torch.dtype):
        self.name = name
        self.segments = segments
        self.options = options
        self.host_for, self.shard_for = host_for, shard_for
        self.checkpoint = checkpoint
        self.caller_device, self.caller_dtype = caller_device, caller_dtype
        self.recovery = Recovery(self)  # stage restart + step retry (split/recovery.py)
        self.transports = Transports(f"mesh-ray-{name}", options.transport, options.start_timeout_s)
        self._pg = None
        self._closed = False
        self._default_gpus = default_num_gpus()
        self._patches: dict[int, tuple[str | None, list | None]] = {}  # segment index -> its set_lora arguments

    @property
    def remote(self) -> list[Segment]:
        return [s for s in self.segments if not s.spec.local]

    @property
    def closed(self) -> bool:
        return self._closed

    def chains(self) -> list[list[Segment]]:
        """Runs of consecutive remote segments: each is entered once per step (``submit_chain``)."""
        out: list[list[Segment]] = []
        for seg in self.segments:
            if seg.spec.local:
                continue
            if out and out[-1][-1].index == seg.index - 1:
                out[-1].append(seg)
            else:
                out.append([seg])
        return out

    # -- start ----------------------------------------------------------------------------------

    def num_gpus(self, spec: StageSpec) -> float:
        """GPUs a stage asks for: its own setting, else one when the cluster has GPUs."""
        return spec.num_gpus if spec.num_gpus is not None else self._default_gpus

    def _actor_options(self, seg: Segment, bundle: int | None) -> dict:
        spec = seg.spec
        opts: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": self.num_gpus(spec),
                                "name": f"mesh-ray/{self.name}/stage{seg.index}",
                                "max_restarts": self.options.max_restarts}
        if spec.node:
            opts["scheduling_strategy"] = node_affinity(spec.node)
        elif self._pg is not None and bundle is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=bundle)
        return opts

    def _make_placement_group(self, remote: list[Segment]) -> None:
        if self.options.placement == "none" or not remote:
            return
        from ray.util.placement_group import placement_group

        bundles = []
        for seg in remote:
            need = {"CPU": seg.spec.num_cpus, "GPU": self.num_gpus(seg.spec)}
            bundles.append({k: v for k, v in need.items() if v} or {"CPU": 0.01})
        self._pg = placement_group(bundles, strategy=self.options.placement.upper())
        try:
            ray.get(self._pg.ready(), timeout=self.options.start_timeout_s)
        except GetTimeoutError:
            raise ClusterError(f"the {len(bundles)} stages cannot be placed with placement={self.options.placement} "
                               f"(bundles {bundles}, {len(ray.nodes())} nodes): add nodes or use placement='pack' "
                               f"or 'spread'") from None

    def start(self, extra_options: dict | None = None) -> None:
        """Place a stage actor on each remote segment, load its weights and plan every link; on any
        failure the actors started so far are closed.  ``extra_options``: more Ray actor options
        (e.g. the runtime environment a host needs)."""
        try:
            self._start(extra_options or {})
        except BaseException:
            self.close()
            raise

    def _start(self, extra_options: dict) -> None:
        remote = self.remote
        rdt_internals.ensure_registered()  # before the stages exist, so that Ray registers them there too
        rdt_internals.set_transfer_timeout(self.options.transfer_timeout_s)
        self._make_placement_group(remote)
        cache_dir = self.options.cache_dir or default_cache_dir()
        threads = self.options.torch_threads or (torch.get_num_threads() if self.caller_device.type == "cpu" else None)
        for k, seg in enumerate(remote):
            init = StageInit(index=seg.index, host=self.host_for(seg), checkpoint_path=seg.spec.checkpoint_path or self.checkpoint,
                             dtype=seg.spec.dtype or self.options.dtype or "auto", cache_dir=cache_dir,
                             torch_threads=seg.spec.torch_threads or threads, offload=self.options.offload,
                             transfer_timeout_s=self.options.transfer_timeout_s)
            actor = StageActor if self.options.transport == "object" else DirectStageActor
            seg.actor = actor.options(**self._actor_options(seg, k), **extra_options).remote(init)
        for seg in remote:
            need = {"CPU": seg.spec.num_cpus, "GPU": self.num_gpus(seg.spec)}
            try:
                ray.get(seg.actor.ready.remote(), timeout=self.options.start_timeout_s)
            except GetTimeoutError:
                raise ClusterError(explain_unschedulable(need, f"stage {seg.index} ({seg.range})")) from None
            except Exception as e:  # noqa: BLE001 - a stage that died while starting: one line, not a traceback
                raise self.stage_error(e, seg, self.options.start_timeout_s, "starting") from None
        loads = [self.load_stage(seg) for seg in remote]
        for seg, ref in zip(remote, loads):
            info = self.stage_get(ref, seg, self.options.start_timeout_s, "loading the blocks")
            self.note_stage(seg, info)
        self.plan_links()

    def note_stage(self, seg: Segment, info: dict) -> bool:
        """Record where a stage runs from its ``info()``; True when it moved (another node or GPU)."""
        moved = (info["node_id"], info.get("gpu_uuid")) != (seg.node_id, seg.gpu)
        seg.node_id, seg.dtype, seg.device = info["node_id"], DTYPES[info["dtype"]], info["device"].split(":")[0]
        seg.gpu, seg.nccl = info.get("gpu_uuid"), bool(info.get("nccl"))
        return moved

    def _caller(self) -> Endpoint:
        dev = self.caller_device
        cuda = dev.type == "cuda"
        index = (dev.index if dev.index is not None else torch.cuda.current_device()) if cuda else 0
        return Endpoint("caller", ray.get_runtime_context().get_node_id(), dev.type, gpu_uuid(index) if cuda else None,
                        caller=True, visible_gpus=visible_gpus() if cuda else ())

    def plan_links(self) -> None:
        """Plan every link from its two ends: codec spec from where they run (auto: raw on one node),
        wire dtype the narrower of their compute dtypes, and the transport (``split/transport.py``;
        the collective groups it needs are made here, again on every call)."""
        caller = self._caller()
        segs = self.segments
        pairs: list[tuple[Segment | None, Segment | None]] = []
        for i, seg in enumerate(segs):
            if seg.spec.local:
                continue
            prev = segs[i - 1] if i > 0 and not segs[i - 1].spec.local else None
            nxt = segs[i + 1] if i + 1 < len(segs) and not segs[i + 1].spec.local else None
            if prev is None:
                pairs.append((None, seg))
            pairs.append((seg, nxt))
        links = [self._link(a, b, caller) for a, b in pairs]
        choices = self.transports.choose(links)
        for (a, b), ln, choice in zip(pairs, links, choices):
            wire = narrower(a.dtype if a else self.caller_dtype, b.dtype if b else self.caller_dtype)
            direct = a is not None and b is not None and choice.transport in DIRECT
            plan = LinkPlan(ln.spec, ln.name, dtype_name(wire), choice.transport, rdt=direct,
                            gpu=b.gpu if a is None and b is not None else None, reason=choice.reason)
            if a is not None:
                a.out_plan = plan
            if b is not None:
                b.in_plan = plan

    def _link(self, a: Segment | None, b: Segment | None, caller: Endpoint) -> Link:
        """The link ``a -> b`` (None: the caller) with its codec spec: ``auto`` resolves raw where a direct
        transport is forced between two stages (it moves raw tensors)."""
        ea, eb = (s.endpoint() if s else caller for s in (a, b))
        codec = self.options.codec
        if a is not None and b is not None and self.options.transport in DIRECT and codec.mode == "auto":
            codec = codec.model_copy(update={"mode": "raw"})
        return Link(a, b, ea, eb, choose_spec(codec, same_node=ea.node_id == eb.node_id))

    def links(self) -> list[dict]:
        """Each link's plan for people: name, codec mode, wire dtype, transport and why."""
        plans = []
        for seg in self.remote:
            if seg.in_plan is not None and seg.in_plan.name.startswith("caller"):
                plans.append(seg.in_plan)
            if seg.out_plan is not None:
                plans.append(seg.out_plan)
        return [{"link": p.name, "mode": p.spec.mode, "dtype": p.dtype, "transport": p.transport, "reason": p.reason}
                for p in plans]

    def links_version(self) -> int:
        """How many times the links' groups were made (a chain remembers the version it was sent under)."""
        return self.transports.version

    def restore_links(self, version: int) -> None:
        """After a failed chain sent under links ``version``: make the collective groups again (a
        restarted stage cannot rejoin the old ones) unless that was done since."""
        if version == self.transports.version and self.transports.groups:
            self.plan_links()

    def load_stage(self, seg: Segment) -> Any:
        """Load from the worker's own file when it can read it, else ship the shard once."""
        readable = self.stage_get(seg.actor.can_read_checkpoint.remote(), seg, 60, "checking the checkpoint")
        if readable and self.options.ship != "always":
            return seg.actor.load_from_file.remote()
        if self.options.ship == "never":
            raise StageError(f"stage {seg.index} cannot read {seg.spec.checkpoint_path or self.checkpoint} on its "
                             f"node and ship='never': copy the file there, set checkpoint_path, or allow ship='auto'")
        return send_shard(seg.actor, self.shard_for(seg), lambda ref, doing: self.stage_get(ref, seg, 60, doing))

    # -- errors ---------------------------------------------------------------------------------

    def stage_get(self, ref: Any, seg: Segment | None, timeout: float, doing: str) -> Any:
        """``ray.get`` on a stage call, its failures as one-line errors."""
        try:
            return ray.get(ref, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - every failure becomes one line
            raise self.stage_error(e, seg, timeout, doing) from None

    def stage_error(self, e: BaseException, seg: Segment | None, timeout: float, doing: str) -> MeshError:
        """A Ray failure while ``doing`` on ``seg`` as the one-line error the caller sees."""
        where = f"stage {seg.index} ({seg.range})" if seg else "a stage"
        return ray_error(e, f"{doing} on {where}", timeout, timeout_error=StageError, died_error=StageError,
                         timeout_fix="check the worker with `mesh-ray status`, or raise step_timeout_s / start_timeout_s",
                         died_fix="its worker crashed or its node left; create the split again")

    # -- a step ---------------------------------------------------------------------------------

    def submit_chain(self, chain: list[Segment], state: Streams | Any, cond: Any, gen: GenConsts,
                     remember: bool = True) -> Any:
        """Submit one micro-batch through consecutive remote segments without waiting; returns the
        ObjectRef of the last stage's WireState.  The one place a step enters a chain of stages (plain
        calls, pipelining, retries and block patches all come here); the inputs are kept until
        ``collect`` so that a step lost with a stage can be sent again.  ``state``: Streams (packed
        for the chain's first link) or a host's own first-stage input; ``cond``: the step's
        conditioning in the host's form, on the host (CPU)."""
        if self._closed:
            raise MeshError("this split was closed: create a new one")
        version = self.transports.version
        direct = any(seg.out_plan.rdt for seg in chain)
        if direct:
            rdt_internals.revive_monitor()
        try:
            ref = self._send(chain, state, cond, gen, direct)
        except _GroupGone as e:  # Ray dropped a group (its abort path after a failed transfer): make it again
            log.warning("a direct transport's group is gone (%s): making it again", e)
            self.restore_links(version)
            version = self.transports.version
            try:
                ref = self._send(chain, state, cond, gen, direct)
            except _GroupGone:  # still refused: this step goes through the object store
                ref = self._send(chain, state, cond, gen, False)
        if remember:
            self.recovery.remember(ref, ChainCall(chain, state, cond, gen, version, direct))
        return ref

    def _send(self, chain: list[Segment], state: Streams | Any, cond: Any, gen: GenConsts, direct: bool) -> Any:
        """Submit the chain; with ``direct`` each stage's result goes on over its link's direct
        transport (applied to the call that produces it), else through the object store."""
        ref = pack(state, chain[0].in_plan) if isinstance(state, Streams) else state
        incoming = False
        for seg in chain:
            plan = seg.out_plan
            if plan.rdt and not direct:
                plan = replace(plan, transport="object", rdt=False, reason="its group could not be made again")
            call = seg.actor.forward.options(tensor_transport=ray_name(plan)) if plan.rdt else seg.actor.forward
            try:
                ref = call.remote(ref, cond, gen, plan)
            except ValueError as e:  # Ray refuses an RDT call or argument whose group it no longer knows
                if not (plan.rdt or incoming):
                    raise
                raise _GroupGone(" ".join(str(e).split())[:200]) from None
            incoming = plan.rdt
        return ref

    def collect(self, ref: Any, seg: Segment, device: torch.device, dtype: torch.dtype,
                doing: str = "a forward step") -> tuple[Streams, list[Hop]]:
        """Wait (step_timeout_s) for a chain submitted with ``submit_chain`` ending at ``seg``; the
        streams on ``device`` in ``dtype`` and the hops they made.  A stage that died is restarted and
        the chain sent again (``max_restarts``, ``max_step_retries``)."""
        wire = self.recovery.wait(ref, seg, doing)
        return unpack(wire, device, dtype)

    # -- info and teardown ----------------------------------------------------------------------

    def info(self, timeout_s: float = 30) -> list[dict]:
        """Each remote stage's own report (``StageClass.info``)."""
        return [self.stage_get(seg.actor.info.remote(), seg, timeout_s, "reporting its info") for seg in self.remote]

    def send_patches(self, patches_for: Callable[[Segment], Any], digest: str | None) -> None:
        """Put weight patches on every remote stage (each gets ``patches_for(seg)``; falsy: none).  The
        group keeps them in the object store, so a stage that restarts gets them again (``restore_patches``)."""
        calls = []
        for seg in self.remote:
            sub = patches_for(seg)
            self._patches[seg.index] = (digest, [ray.put(sub)]) if sub else (None, None)
            calls.append((seg, seg.actor.set_lora.remote(*self._patches[seg.index])))
        for seg, ref in calls:
            self.stage_get(ref, seg, self.options.start_timeout_s, "applying weight patches")

    def restore_patches(self, seg: Segment, timeout: float) -> None:
        """Put the weight patches last sent to ``seg`` on it again (after a restart reloaded its blocks)."""
        digest, boxed = self._patches.get(seg.index, (None, None))
        if boxed is not None:
            self.stage_get(seg.actor.set_lora.remote(digest, boxed), seg, timeout, "applying weight patches again")

    def close(self) -> None:
        """Kill the stage actors and free their resources (idempotent)."""
        self._closed = True
        self._patches.clear()
        self.recovery.forget()
        self.transports.forget()
        for seg in self.segments:
            if seg.actor is not None:
                try:
                    ray.kill(seg.actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                seg.actor = None
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None


class _GroupGone(Exception):
    """Ray refused a direct transfer at submit time: the link's group is gone (Ray's abort path)."""


__all__ = ["GenerationCache", "Segment", "StageGroup", "put_consts"]
