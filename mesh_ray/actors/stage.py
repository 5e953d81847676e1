"""Stage actor: holds one block range of a DiT on one device and runs it.

A plain class; ``StageActor = ray.remote(StageClass)`` (``DirectStageActor``: the same, with Ray
Direct Transport allowed on its calls).  What the range is and how its blocks are
built and called is the stage's ``BlockHost`` (``actors/host.py``: mesh-ray's own FLUX, or
ComfyUI's blocks of any architecture); the stage does the rest the same way for every host:
device and dtype, loading (file, node cache, or shipped), per-generation constants, the wire,
offload, metrics and info.  Placement and resources are options at creation (``mesh_ray.split``),
not code in here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections import OrderedDict, deque
from typing import Any

import ray
import torch
from pydantic import BaseModel, ConfigDict

from mesh_ray.actors.cuda_ipc import gpu_uuid
from mesh_ray.actors.device import dtype_name, pick_device
from mesh_ray.actors.front import FrontInput
from mesh_ray.actors.host import BlockHost
from mesh_ray.actors.records import GenConsts, LinkPlan
from mesh_ray.actors.shards import ShardCache
from mesh_ray.actors.wire import Streams, WireState, pack, unpack
from mesh_ray.cluster import metrics, rdt_internals
from mesh_ray.errors import StageError
from mesh_ray.memory import AutoOffload, OffloadSpec

GENERATIONS_KEPT = 16  # per-generation constants cached per stage (LRU): images in flight at once
CONST_FETCH_TIMEOUT_S = 600
GLOO_SHARE = 0.8  # a gloo op times out first, so the receiver learns why before Ray's own transfer deadline


class NotLoadedError(StageError):
    """A step reached a stage that holds no weights (a restarted actor before its reload)."""


class StageInit(BaseModel):
    """Everything a stage needs to build itself (sent once at creation)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: int
    host: Any  # a BlockHost
    checkpoint_path: str | None = None  # a file its node may read; None: the weights are always shipped
    dtype: str = "auto"  # "auto": decided here, from this stage's own device (see actors/device.py)
    cache_dir: str
    torch_threads: int | None = None
    offload: OffloadSpec | None = None
    transfer_timeout_s: float | None = None  # bounds a Ray Direct Transport transfer (SplitOptions.transfer_timeout_s)


class StageClass:
    """One block range on one device; ``forward`` takes and returns the streams between blocks."""

    def __init__(self, init: StageInit):
        self.init = init
        if init.torch_threads:
            torch.set_num_threads(init.torch_threads)
        rdt_internals.ensure_registered()  # again after a restart: Ray registers custom transports once per actor
        if init.transfer_timeout_s:
            rdt_internals.set_transfer_timeout(init.transfer_timeout_s)
            rdt_internals.bound_collective_timeout(GLOO_SHARE * init.transfer_timeout_s)
        self.device, self.dtype = pick_device(init.dtype)
        self.host: BlockHost = init.host
        self.host.build(self.device, self.dtype)
        self.loaded = False
        self.shard_source = "none"
        self.shard_digest: str | None = None
        self._cache = ShardCache(init.cache_dir)  # other stages on this node reuse what it holds
        self._consts: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._backups: dict[str, torch.Tensor] = {}
        self.offload: AutoOffload | None = None
        self.lora_digest: str | None = None
        self.lora_updates = 0
        self.calls = 0
        self.busy_s = 0.0
        self.recent: deque[tuple[float, float]] = deque(maxlen=64)  # wall-clock (start, end) of forwards

    @property
    def label(self) -> str:
        return f"stage {self.init.index} ({self.host.describe()})"

    # -- loading --------------------------------------------------------------------------------

    def ready(self) -> bool:
        return True

    def can_read_checkpoint(self) -> bool:
        p = self.init.checkpoint_path
        return bool(p) and os.path.isfile(p) and os.access(p, os.R_OK)

    def load_from_file(self) -> dict:
        """Slim-load this stage's blocks from the checkpoint path (readable on this node)."""
        self._install(self.host.read_checkpoint(self.init.checkpoint_path), "file")
        return self.info()

    def has_cached_shard(self, digest: str) -> bool:
        return self._cache.has(digest)

    def load_from_cache(self, digest: str) -> dict:
        self._install(self._cache.load(digest, lambda p: self.host.read_checkpoint(str(p)), self.label), "cache", digest)
        return self.info()

    def load_from_shard(self, digest: str, shard_box: list) -> dict:
        """Load tensors sent through the object store (``shard_box`` = [ObjectRef]) and cache them."""
        sd = self._cache.receive(digest, shard_box, lambda t, path: self.host.save_shard(t, str(path)))
        self._install(sd, "object_store", digest)
        return self.info()

    def _install(self, sd: dict[str, torch.Tensor], source: str, digest: str | None = None) -> None:
        self.host.install(sd)
        spec = self.init.offload
        if self.offload is not None:
            self.offload.detach()
            self.offload = None
        offloaded = spec is not None and spec.enabled
        self.host.to_device(self.device, blocks=not offloaded)
        if offloaded:
            # Weights stay in host memory and stream to the device a window of blocks at a time.
            self.offload = AutoOffload.from_spec(self.host.module(),
                                                 spec.model_copy(update={"device": spec.device or str(self.device)}))
        self._backups.clear()  # fresh weights: nothing patched
        self.lora_digest = None
        self.loaded = True
        self.shard_source = source
        self.shard_digest = digest

    # -- running --------------------------------------------------------------------------------

    def _constants(self, gen: GenConsts) -> dict[str, Any]:
        """Per-generation constants, fetched once and cached by generation id (LRU)."""
        key = gen.id
        if key not in self._consts:
            fetched = {name: ray.get(box[0], timeout=CONST_FETCH_TIMEOUT_S) for name, box in gen.refs.items()}
            self._consts[key] = {**self.host.prepare_consts(fetched), "grid": gen.grid}
            while len(self._consts) > GENERATIONS_KEPT:
                self._consts.popitem(last=False)
        self._consts.move_to_end(key)
        return self._consts[key]

    @torch.inference_mode()
    def forward(self, state: WireState | FrontInput, cond: Any, gen: GenConsts, out: LinkPlan) -> WireState:
        """Run this stage's blocks on ``state`` in this stage's dtype; the result goes on as an
        ObjectRef, cast and coded as the caller planned the outgoing link (``out``).  ``cond`` is the
        step's conditioning in the host's form; what else the host needs per generation is cached."""
        if not self.loaded:  # e.g. just restarted by Ray: the split reloads the shard and sends the step again
            raise NotLoadedError(f"stage {self.init.index} has no weights loaded: create the split through mesh.split()")
        t0, wall0 = time.perf_counter(), time.time()
        consts = self._constants(gen)
        if isinstance(state, WireState):
            streams, hops = unpack(state, self.device, self.dtype, borrow=True)  # blocks never write their input
        else:  # the host's own first-stage input (FLUX: a FrontInput with the front on the stages)
            streams, hops = state, list(getattr(state, "hops", []))
        with self.offload.forward_pass() if self.offload else contextlib.nullcontext():
            result = self.host.run(streams, cond, consts)
        wire = pack(result, self.host.out_plan(out), hops)
        self.calls += 1
        self.busy_s += time.perf_counter() - t0
        metrics.stage_step(self.init.index, (time.perf_counter() - t0) * 1000)
        self.recent.append((wall0, time.time()))
        return wire

    def set_lora(self, digest: str | None, box: list | None) -> dict:
        """Patch this stage's blocks with a weight-patch set (``box`` = [ObjectRef]; its form is the
        host's: mesh-ray's LoRA sets, or ComfyUI's patches), replacing the previous set; None removes
        it.  The unpatched weights are kept to restore."""
        patches = ray.get(box[0], timeout=CONST_FETCH_TIMEOUT_S) if box else {}
        patched = self.host.patch_weights(patches, self._backups)
        self.lora_digest = digest if patched else None
        self.lora_updates += 1
        return {"lora": self.lora_digest, "patched": patched, "updates": self.lora_updates}

    def echo(self, state: WireState) -> WireState:
        """Return the input unchanged: the cost of one hop without compute (for benchmarks)."""
        return state

    def probe(self, nbytes: int, plan: LinkPlan) -> WireState:
        """``nbytes`` of activation-like data packed for ``plan``: what a link measures itself with."""
        return pack(Streams({"x": torch.ones(max(1, nbytes // 4), device=self.device)}), plan)

    def take(self, state: WireState) -> int:
        """Receive a ``probe`` (or any WireState) and drop it; its tensor count."""
        return len(unpack(state, self.device, self.dtype, borrow=True)[0].tensors)

    def info(self) -> dict:
        """Where this stage runs and what it holds (for ``mesh-ray status``)."""
        ctx = ray.get_runtime_context()
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
        except ImportError:  # pragma: no cover - psutil comes with ray[default]
            rss = None
        return {"kind": "stage", "index": self.init.index, "blocks": self.host.describe(), "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "device": str(self.device),
                "dtype": dtype_name(self.dtype),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "gpu_uuid": self._gpu_uuid(),
                "nccl": self.device.type == "cuda" and importlib.util.find_spec("cupy") is not None,
                "loaded": self.loaded,
                "shard_source": self.shard_source, "weight_bytes": self.host.weight_bytes(),
                "rss_bytes": rss,
                "cuda_bytes": torch.cuda.memory_allocated() if self.device.type == "cuda" else 0,
                "calls": self.calls, "busy_s": round(self.busy_s, 3), "lora": self.lora_digest, "threads": torch.get_num_threads(),
                "offload": self.offload.stats() if self.offload else None, "recent_calls": list(self.recent)}

    def _gpu_uuid(self) -> str | None:
        return gpu_uuid(self.device.index or 0) if self.device.type == "cuda" else None


StageActor = ray.remote(StageClass)
# The same stage with Ray Direct Transport allowed on its calls (Ray decides this per class, not per
# actor); its tasks run on a background thread, beside Ray's transfer threads.
DirectStageActor = ray.remote(enable_tensor_transport=True)(StageClass)
