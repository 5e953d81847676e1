"""Stage actor: holds one block range of a FLUX transformer on one device and runs it.

A plain class; ``StageActor = ray.remote(StageClass)``.  Placement and resources are options at
creation (see ``mesh_ray.split.model``), not code in here.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict, deque
from typing import Any

import ray
import torch
from pydantic import BaseModel, ConfigDict

from mesh_ray.cluster import metrics
from mesh_ray.actors.device import dtype_name, pick_device
from mesh_ray.actors.front import FrontInput, embed_input, finish_plan, front_keys, front_modules
from mesh_ray.actors.records import GenConsts, LinkPlan
from mesh_ray.actors.shards import ShardCache
from mesh_ray.actors.wire import WireState, pack_state, unpack_state, with_cached_text
from mesh_ray.errors import StageError
from mesh_ray.memory import AutoOffload, OffloadSpec
from mesh_ray.models.blocks import BlockRange
from mesh_ray.models.checkpoint import load_blocks, save_checkpoint
from mesh_ray.models.flux import BlockCond, BlockState, FluxConfig, build

GENERATIONS_KEPT = 16  # per-generation constants cached per stage (LRU): images in flight at once


class NotLoadedError(StageError):
    """A step reached a stage that holds no weights (a restarted actor before its reload)."""


class StageInit(BaseModel):
    """Everything a stage needs to build itself (sent once at creation)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: int
    config: FluxConfig
    start: int
    stop: int
    checkpoint_path: str
    dtype: str = "auto"  # "auto": decided here, from this stage's own device (see actors/device.py)
    cache_dir: str
    torch_threads: int | None = None
    offload: OffloadSpec | None = None
    embed: bool = False  # front on the stages (actors/front.py): this first stage runs the embedders
    final: bool = False  # ... and this last stage runs the final layer


def move_cond(cond: BlockCond, device: torch.device, dtype: torch.dtype | None = None) -> BlockCond:
    """``cond`` on ``device`` (and in ``dtype`` when given: a stage computes in its own dtype)."""
    def mv(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
        moved = [mv(t) for t in x]
        return type(x)(*moved) if hasattr(x, "_fields") else tuple(moved)  # a Mod record stays one

    return BlockCond(vec=mv(cond.vec), double_img=mv(cond.double_img), double_txt=mv(cond.double_txt),
                     single=mv(cond.single))


class StageClass:
    """One block range on one device; ``forward`` takes and returns the streams between blocks."""

    def __init__(self, init: StageInit):
        self.init = init
        if init.torch_threads:
            torch.set_num_threads(init.torch_threads)
        self.device, self.dtype = pick_device(init.dtype)
        self.range = BlockRange(init.start, init.stop, init.config.depth, init.config.num_blocks)
        self.model = build(init.config, "meta", self.dtype)
        self.loaded = False
        self.shard_source = "none"
        self.shard_digest: str | None = None
        self._cache = ShardCache(init.cache_dir)  # other stages on this node reuse what it holds
        self._consts: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.offload: AutoOffload | None = None
        self.calls = 0
        self.busy_s = 0.0
        self.recent: deque[tuple[float, float]] = deque(maxlen=64)  # wall-clock (start, end) of forwards

    # -- loading --------------------------------------------------------------------------------

    def ready(self) -> bool:
        return True

    def can_read_checkpoint(self) -> bool:
        p = self.init.checkpoint_path
        return os.path.isfile(p) and os.access(p, os.R_OK)

    def load_from_file(self) -> dict:
        """Slim-load this stage's blocks from the checkpoint path (readable on this node)."""
        sd = load_blocks(self.init.checkpoint_path, [self.range], non_block=self.has_front, dtype=self.dtype,
                         device="cpu")
        self._install(sd, "file")
        return self.info()

    def has_cached_shard(self, digest: str) -> bool:
        return self._cache.has(digest)

    def load_from_cache(self, digest: str) -> dict:
        sd = self._cache.load(digest, lambda p: load_blocks(p, [self.range], non_block=self.has_front,
                                                                        device="cpu"), f"stage {self.init.index}")
        self._install({k: v.to(self.dtype) for k, v in sd.items()}, "cache", digest)
        return self.info()

    def load_from_shard(self, digest: str, shard_box: list) -> dict:
        """Load tensors sent through the object store (``shard_box`` = [ObjectRef]) and cache them."""
        sd = self._cache.receive(digest, shard_box, lambda t, path: save_checkpoint(t, path, self.init.config))
        self._install({k: v.to(self.dtype) for k, v in sd.items()}, "object_store", digest)
        return self.info()

    def _install(self, sd: dict[str, torch.Tensor], source: str, digest: str | None = None) -> None:
        expected = {k for k in self.model.state_dict() if k.startswith(tuple(self.range.keys_prefixes()))}
        expected |= front_keys(self.model) if self.has_front else set()
        missing = sorted(expected - set(sd))
        if missing:
            raise StageError(f"stage {self.init.index} ({self.range}): checkpoint lacks {len(missing)} tensors "
                             f"such as {missing[0]}: the file does not match the model config; re-export it")
        try:
            self.model.load_state_dict(sd, strict=False, assign=True)
        except RuntimeError as e:
            raise StageError(f"stage {self.init.index} ({self.range}): tensor shapes do not match the model "
                             f"({str(e).splitlines()[-1].strip()}): the checkpoint does not match its config") from None
        spec = self.init.offload
        for mod in front_modules(self.model) if self.has_front else []:
            mod.to(self.device)
        if self.offload is not None:
            self.offload.detach()
            self.offload = None
        if spec is not None and spec.enabled:
            # Weights stay in host memory and stream to the device a window of blocks at a time.
            self.offload = AutoOffload.from_spec(self.model, spec.model_copy(update={"device": spec.device or str(self.device)}))
        else:
            for b in self.range:
                self.model.block(b).to(self.device)
        self.loaded = True
        self.shard_source = source
        self.shard_digest = digest

    @property
    def has_front(self) -> bool:
        """This stage holds the embedders and final layer too (``SplitOptions.front="stage"``)."""
        return self.init.embed or self.init.final

    # -- running --------------------------------------------------------------------------------

    def _constants(self, gen: GenConsts) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-generation constants (rotary pe, unchanged text tokens), fetched once and cached."""
        key = gen.id
        if key not in self._consts:
            pe = ray.get(gen.pe[0], timeout=600).to(self.device)  # rotary pe stays fp32, as in the local model
            txt = ray.get(gen.txt[0], timeout=600).to(self.device, self.dtype) if gen.txt else None
            if txt is not None and self.init.embed:  # the caller sent the text before its embedder
                txt = self.model.embed_text(txt)
            self._consts[key] = {"pe": pe, "txt": txt}
            while len(self._consts) > GENERATIONS_KEPT:
                self._consts.popitem(last=False)
        self._consts.move_to_end(key)
        c = self._consts[key]
        return c["pe"], c["txt"]

    @torch.inference_mode()
    def forward(self, state: WireState | FrontInput, cond: BlockCond | None, gen: GenConsts, out: LinkPlan) -> WireState:
        """Run this stage's blocks on ``state`` in this stage's dtype; the result goes on as an
        ObjectRef, cast and coded as the caller planned the outgoing link (``out``).  With the front on
        the stages ``cond`` is None: the first stage embeds a ``FrontInput`` and the conditioning
        travels with the state; the last stage sends back the final layer's output."""
        if not self.loaded:  # e.g. just restarted by Ray: the split reloads the shard and sends the step again
            raise NotLoadedError(f"stage {self.init.index} has no weights loaded: create the split through mesh.split()")
        t0, wall0 = time.perf_counter(), time.time()
        pe, txt = self._constants(gen)
        front = cond is None
        if isinstance(state, FrontInput):
            state, cond, hops = *embed_input(self.model, state, txt, self.device, self.dtype), list(state.hops)
        else:
            cond = state.cond if front else cond
            state, hops = unpack_state(state, self.device, self.dtype, borrow=True)  # blocks never write their input
            state = with_cached_text(state, txt)
        here = move_cond(cond, self.device, self.dtype)
        with self.offload.forward_pass() if self.offload else contextlib.nullcontext():
            state = self.model.run_blocks(state, here, pe, self.range.start, self.range.stop)
        if front and self.init.final:
            result = pack_state(BlockState(self.model.finish(state, here), None, 0), finish_plan(out), None, hops)
        else:
            result = pack_state(state, out, gen.grid, hops)
            result.cond = move_cond(cond, torch.device("cpu")) if front else None
        self.calls += 1
        self.busy_s += time.perf_counter() - t0
        metrics.stage_step(self.init.index, (time.perf_counter() - t0) * 1000)
        self.recent.append((wall0, time.time()))
        return result

    def set_lora(self, digest: str | None, box: list | None) -> dict:
        """Patch this stage's blocks with a LoRA set (``mesh_ray.models.lora``; ``box`` = [ObjectRef]),
        replacing the previous set; None removes it.  The unpatched weights are kept to restore."""
        from mesh_ray.models.lora import apply

        lset = ray.get(box[0], timeout=600) if box else {}
        backups = self.__dict__.setdefault("_lora_backups", {})
        patched = apply(self.model, lset, backups)
        self.lora_digest = digest if patched else None
        self.lora_updates = getattr(self, "lora_updates", 0) + 1
        return {"lora": self.lora_digest, "patched": patched, "updates": self.lora_updates}

    def echo(self, state: WireState) -> WireState:
        """Return the input unchanged: the cost of one hop without compute (for benchmarks)."""
        return state

    def info(self) -> dict:
        """Where this stage runs and what it holds (for ``mesh-ray status``)."""
        ctx = ray.get_runtime_context()
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
        except ImportError:  # pragma: no cover - psutil comes with ray[default]
            rss = None
        weights = sum(p.numel() * p.element_size() for b in self.range for p in self.model.block(b).parameters())
        return {"kind": "stage", "index": self.init.index, "blocks": str(self.range), "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "device": str(self.device),
                "dtype": dtype_name(self.dtype),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "loaded": self.loaded,
                "shard_source": self.shard_source, "weight_bytes": weights, "rss_bytes": rss,
                "cuda_bytes": torch.cuda.memory_allocated() if self.device.type == "cuda" else 0,
                "calls": self.calls, "busy_s": round(self.busy_s, 3), "lora": getattr(self, "lora_digest", None), "threads": torch.get_num_threads(),
                "offload": self.offload.stats() if self.offload else None, "recent_calls": list(self.recent)}


StageActor = ray.remote(StageClass)
