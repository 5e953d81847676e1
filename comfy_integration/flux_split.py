"""A ComfyUI FLUX.1 MODEL whose back blocks run on mesh-ray stages (what MeshSplitFlux returns).

* The remote blocks' weights go from the ComfyUI model to a safetensors shard named by content
  hash (written once per model and plan), which the stages load (or are shipped).
* The returned MODEL is a clone of the ModelPatcher: the same BaseModel, with an object patch that
  swaps the block lists for ones where remote blocks are weightless placeholders, so ComfyUI's
  model management never loads (or counts) their weights, and ``patches_replace["dit"]`` entries
  that run them on the stages.  The input MODEL is untouched.
* ``RemoteBlocks`` owns the ``SplitModel`` and re-creates the stages when they died or were closed.

ComfyUI is imported only inside functions: this module is used only inside a ComfyUI process.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from mesh_ray.actors.shards import default_cache_dir
from mesh_ray.config import SplitOptions, StageSpec
from mesh_ray.errors import ConfigError, MeshError, StageError
from mesh_ray.models.lora import LoraSet
from mesh_ray.split.lora import send
from mesh_ray.mesh import Mesh
from mesh_ray.models.blocks import BlockRange
from mesh_ray.models.checkpoint import save_checkpoint, shard_digest
from mesh_ray.models.flux import FluxConfig
from mesh_ray.split.model import SplitModel

from .connection import live_mesh
from .registry import record_split

MARK = "mesh_ray_split"  # transformer_options key marking a MODEL that is already split
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
PING_TIMEOUT_S = 10.0


# -- what the ComfyUI model is ------------------------------------------------------------------

def flux_module(model: Any) -> torch.nn.Module:
    """The FLUX.1 diffusion model inside a ComfyUI MODEL, or a one-line ConfigError."""
    from comfy.ldm.flux.model import Flux

    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if type(inner) is not Flux:  # Chroma and other subclasses lay their blocks out differently
        what = type(inner).__name__ if inner is not None else type(model).__name__
        raise ConfigError(f"MeshSplitFlux needs a FLUX.1 model (dev or schnell), got {what}: load a FLUX.1 "
                          f"diffusion model (UNETLoader / CheckpointLoaderSimple) into its model input")
    if MARK in model.model_options.get("transformer_options", {}):
        raise ConfigError("this MODEL is already split by a MeshSplitFlux node: connect the unsplit model instead")
    return inner


def flux_config(dm: torch.nn.Module) -> FluxConfig:
    """mesh-ray's config of ComfyUI's Flux module (same BFL layout, so weights map key for key)."""
    p = dm.params
    return FluxConfig(arch="flux1", in_channels=p.in_channels * p.patch_size ** 2, vec_in_dim=p.vec_in_dim,
                      context_in_dim=p.context_in_dim, hidden_size=p.hidden_size, num_heads=p.num_heads,
                      mlp_ratio=p.mlp_ratio, depth=p.depth, depth_single_blocks=p.depth_single_blocks,
                      axes_dim=list(p.axes_dim), theta=p.theta, qkv_bias=p.qkv_bias, guidance_embed=p.guidance_embed)


def compute_dtype(model: Any) -> str:
    """The dtype ComfyUI computes this model in (the stages use the same)."""
    base = model.model
    dt = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return _DTYPE_NAMES.get(dt, "bfloat16")  # fp8 storage computes in a 16-bit type


def block_list(model: Any, attr: str) -> torch.nn.ModuleList:
    """The model's own ``double_blocks``/``single_blocks``, even while a split clone's object patch
    (placeholders for remote blocks) is applied: ComfyUI keeps the original in the shared backup."""
    own = model.object_patches_backup.get(f"diffusion_model.{attr}")
    return own if own is not None else getattr(model.model.diffusion_model, attr)


def block_module(model: Any, b: int) -> torch.nn.Module:
    depth = len(block_list(model, "double_blocks"))
    return block_list(model, "double_blocks")[b] if b < depth else block_list(model, "single_blocks")[b - depth]


def block_prefix(model: Any, b: int) -> str:
    depth = len(block_list(model, "double_blocks"))
    return f"double_blocks.{b}." if b < depth else f"single_blocks.{b - depth}."


def remote_bytes(model: Any, ranges: list[BlockRange]) -> int:
    """Parameter bytes of the blocks that run remotely (what the ComfyUI process no longer loads)."""
    return sum(t.numel() * t.element_size() for r in ranges for b in r
               for t in block_module(model, b).state_dict().values())


# -- the shard the stages load ------------------------------------------------------------------

_shards: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_shard_lock = threading.Lock()


def remote_state_dict(model: Any, ranges: list[BlockRange], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The remote blocks' base weights (without ComfyUI's weight patches, e.g. LoRAs) on the CPU."""
    out = {}
    for r in ranges:
        for b in r:
            prefix = block_prefix(model, b)
            for name, t in block_module(model, b).state_dict().items():
                backup = model.backup.get(f"diffusion_model.{prefix}{name}")  # patched in place: the original
                t = backup.weight if backup is not None else t
                out[prefix + name] = t.detach().to("cpu", dtype).contiguous()
    return out


def shard_file(model: Any, config: FluxConfig, ranges: list[BlockRange], dtype: str) -> Path:
    """A safetensors file with the remote blocks, named by content hash (hashed once per model and plan)."""
    dm = model.model.diffusion_model
    key = (tuple((r.start, r.stop) for r in ranges), dtype)
    with _shard_lock:
        known = _shards.setdefault(dm, {})
        path = known.get(key)
        if path is not None and path.is_file():
            return path
        sd = remote_state_dict(model, ranges, getattr(torch, dtype))
        path = Path(default_cache_dir()).parent / "comfyui" / f"{shard_digest(sd)}.safetensors"
        if not path.is_file():
            save_checkpoint(sd, path, config)
        known[key] = path
        return path


# -- the stages, re-created when they die -------------------------------------------------------

class RemoteBlocks:
    """The stage actors of one MeshSplitFlux node: built on demand, rebuilt after a stage died."""

    def __init__(self, key: str, mesh: Mesh, shard: Path, specs: list[StageSpec], options: SplitOptions,
                 plan: str, address: str):
        self.key, self.mesh, self.shard, self.specs = key, mesh, shard, specs
        self.options, self.plan, self.address = options, plan, address
        self.split: SplitModel | None = None
        self.builds = 0
        self.lora_applied: str | None = None  # content hash of the LoRA set on the stages
        self.lora_ships = 0
        self._patches: dict = {}
        self._lock = threading.RLock()

    def ensure(self) -> SplitModel:
        """The live split, created now if there is none (first use, closed, or after a death)."""
        with self._lock:
            self._follow_cluster()
            if self.split is None or self.split.closed:
                self._build()
            return self.split

    def _follow_cluster(self) -> None:
        """Move to the process's new connection when the cluster went away and came back; while it is
        down, a one-line ClusterError (and a red light) instead of a call that Ray would hang or abort."""
        try:
            mesh = live_mesh(self.mesh)
        except MeshError as e:
            record_split(self.key, None, self.address, self.plan, str(e))
            raise
        if mesh is not self.mesh:  # the old stages went with the old cluster: nothing to close there
            self.mesh, self.split, self._patches = mesh, None, {}

    def _build(self) -> None:
        try:
            split = self.mesh.split(str(self.shard), stages=self.specs, options=self.options, load_local=False)
        except MeshError as e:
            record_split(self.key, None, self.address, self.plan, str(e))
            raise
        self.split, self._patches = split, split.block_patches()
        self.lora_applied = None  # fresh stages hold the base weights
        self.builds += 1
        record_split(self.key, split, self.address, self.plan)

    def alive(self, timeout_s: float = PING_TIMEOUT_S) -> bool:
        """Whether every stage actor answers."""
        split = self.split
        if split is None or split.closed:
            return False
        refs = [s.actor.ready.remote() for s in split.segments if s.actor is not None]
        try:
            ray.get(refs, timeout=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - RayActorError, timeouts: the stage is gone
            return False

    def same_build(self, shard: Path, specs: list[StageSpec], options: SplitOptions) -> bool:
        """Whether these stages already run this shard and plan (then a LoRA change needs no restart)."""
        return self.shard == shard and self.specs == specs and self.options == options

    def use_lora(self, lora: tuple[str | None, LoraSet]) -> None:
        """Put LoRA set ``lora`` = (hash, set) on the stages unless it is there already (shipped once)."""
        dg, lset = lora
        with self._lock:
            split = self.ensure()
            if self.lora_applied != dg:
                send(split, lset, dg)
                self.lora_applied = dg
                self.lora_ships += 1

    def run(self, block: tuple[str, int], args: dict, extra: dict, lora: tuple[str | None, LoraSet]) -> dict:
        """Run one patched block (the first of a remote chain runs the whole chain)."""
        try:
            self.use_lora(lora)
            return self._patches[block](args, extra)
        except StageError:
            with self._lock:
                if self.alive():
                    raise
                self.close()  # a stage died since the last queue: re-create all of them once
                self._build()
            self.use_lora(lora)
            return self._patches[block](args, extra)

    def patch(self, block: tuple[str, int], lora: tuple[str | None, LoraSet]) -> Callable[[dict, dict], dict]:
        """A ``patches_replace["dit"]`` entry (a plain closure: ComfyUI deep-copies model options)."""
        def run(args: dict, extra: dict) -> dict:
            return self.run(block, args, extra, lora)
        return run

    def close(self) -> None:
        with self._lock:
            if self.split is not None:
                self.split.close()


class RemotePlaceholder(torch.nn.Module):
    """Stands in for a block that runs on a stage: no weights, so ComfyUI loads nothing for it."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise MeshError(f"{self.label} runs on a mesh-ray stage but was called directly: a node after "
                        f"MeshSplitFlux replaced ComfyUI's block patches; place it before MeshSplitFlux")


def restore_blocks(patcher: Any) -> None:
    """Undo the placeholder object patch on the shared model (ComfyUI re-applies it when loading)."""
    import comfy.utils

    for attr in ("double_blocks", "single_blocks"):
        k = f"diffusion_model.{attr}"
        if k in patcher.object_patches and k in patcher.object_patches_backup:
            comfy.utils.set_attr(patcher.model, k, patcher.object_patches_backup.pop(k))


def split_clone(model: Any, remote: RemoteBlocks, ranges: list[BlockRange],
                lora: tuple[str | None, LoraSet] = (None, {})) -> Any:
    """A clone of ``model`` whose ``ranges`` run through ``remote``; ``model`` stays as it was."""
    depth = len(block_list(model, "double_blocks"))
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    clone = model.clone()
    blocks = {b for r in ranges for b in r}
    for attr, offset, kind in (("double_blocks", 0, "double_block"), ("single_blocks", depth, "single_block")):
        mods = block_list(model, attr)
        mine = [i for i in range(len(mods)) if i + offset in blocks]
        if not mine:
            continue
        taken = [i for i in mine if (kind, i) in replace]
        if taken:
            raise ConfigError(f"another node already replaces {kind} {taken[0]} of this model: place it after "
                              f"MeshSplitFlux only if it patches local blocks, or keep those blocks local")
        clone.add_object_patch(f"diffusion_model.{attr}", torch.nn.ModuleList(
            [RemotePlaceholder(f"{kind} {i}") if i in mine else m for i, m in enumerate(mods)]))
        for i in mine:
            clone.set_model_patch_replace(remote.patch((kind, i), lora), "dit", kind, i)
    # After sampling, put the real block lists back into the shared model: other nodes (a LoraLoader
    # building its key map, a model saver) must see every block; the next load re-applies the patch.
    import comfy.patcher_extension

    clone.add_callback(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, restore_blocks)
    clone.model_options["transformer_options"][MARK] = {"key": remote.key, "plan": remote.plan, "lora": lora[0]}
    # Weight patches of remote blocks do not apply here: drop them (forwarded to the stages instead).
    prefixes = tuple(f"diffusion_model.{block_prefix(model, b)}" for b in blocks)
    for k in [k for k in clone.patches if k.startswith(prefixes)]:
        del clone.patches[k]
    clone.patches_uuid = uuid.uuid4()  # its own weight state: switching to it unloads the full model
    clone.size = max(0, model.model_size() - remote_bytes(model, ranges))
    return clone
