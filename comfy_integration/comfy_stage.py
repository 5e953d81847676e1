"""ComfyUI's own blocks on a stage: the ``BlockHost`` that Mesh Split Model sends to its stage actors.

A stage imports the same ComfyUI as the ComfyUI process (``ComfySource.activate``), rebuilds the
model's config from plain data (``ModelSpec``), builds the diffusion model on the meta device with
ComfyUI's own constructor and operations (exactly as ``BaseModel.__init__`` does) and keeps only its
blocks.  Their weights come from the user's checkpoint file through ComfyUI's own key conversions
(old scaled-fp8 and ``comfy_quant`` files included; fp8 stays fp8), or from a shard the ComfyUI
process shipped.  Each block runs with the call ComfyUI's ``block_wrap`` makes (the architecture
adapter, ``archs/``); weight patches (LoRAs and every other form ComfyUI knows) are applied by
ComfyUI's own ``ModelPatcher`` under the same key names, so they round as in the ComfyUI process.

ComfyUI is imported only inside methods: this module is pickled to the stages by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mesh_ray.actors.records import LinkPlan
from mesh_ray.actors.wire import Streams
from mesh_ray.errors import StageError

from .archs import BY_NAME, block_options
from .comfy_env import ComfySource

SHARD_MARK = "mesh_ray_comfy_shard"  # safetensors metadata of a shard this module wrote (keys already converted)


@dataclass(frozen=True)
class ModelSpec:
    """A ComfyUI model's config as plain data: what a stage needs to build the same blocks."""

    arch: str  # an adapter name (archs.BY_NAME)
    config_class: str  # comfy.supported_models class, e.g. "Flux2"
    unet_config: dict  # as detected, with the weight dtype
    manual_cast_dtype: Any
    quant_config: Any = None  # 0.20: mixed-precision (scaled fp8, comfy_quant) files
    scaled_fp8: Any = None  # 0.3.64: scaled fp8 files
    optimizations: dict = dataclasses.field(default_factory=dict)
    file_prefix: str = ""  # key prefix of the checkpoint file ("model.diffusion_model." in full checkpoints)
    source: ComfySource | None = None

    def model_config(self) -> Any:
        """ComfyUI's model config rebuilt from this spec (in a process that imported ComfyUI)."""
        import comfy.supported_models

        cfg = getattr(comfy.supported_models, self.config_class)(dict(self.unet_config))
        cfg.unet_config = dict(self.unet_config)  # detected values verbatim (the dtype included)
        cfg.manual_cast_dtype = self.manual_cast_dtype
        cfg.quant_config = self.quant_config
        if self.scaled_fp8 is not None:  # 0.3.64 only (0.20 warns on the name)
            cfg.scaled_fp8 = self.scaled_fp8
        cfg.optimizations = dict(self.optimizations)
        return cfg


def read_blocks(path: str, spec: ModelSpec, prefixes: tuple[str, ...], config: Any = None) -> dict[str, torch.Tensor]:
    """Only the tensors of the blocks under ``prefixes`` (``double_blocks.3.``) from ``path``: a user's
    checkpoint through ComfyUI's own key conversions, in the order ``load_diffusion_model`` applies
    them, or a shard written by ``save_shard`` (keys already converted)."""
    from safetensors import safe_open

    import comfy.utils

    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        ours = meta.get(SHARD_MARK) == "1"
        pre = "" if ours else spec.file_prefix
        wanted = tuple(pre + p for p in prefixes)
        markers = () if ours else ("scaled_fp8", pre + "scaled_fp8")
        sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted) or k in markers}
    if not ours:
        convert = getattr(comfy.utils, "convert_old_quants", None)  # 0.20; 0.3.64 keeps scale_weight as parameters
        if convert is not None:
            sd, _ = convert(sd, "", metadata=meta)
        if pre:
            sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            if convert is not None:
                sd, _ = convert(sd, "", metadata=meta)
        sd.pop("scaled_fp8", None)
        sd = (config or spec.model_config()).process_unet_state_dict(sd)
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


def tree_map(fn: Any, value: Any) -> Any:
    """``fn`` on every tensor inside ``value`` (containers, records, ComfyUI's slotted timesteps)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        items = [tree_map(fn, v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: tree_map(fn, v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: tree_map(fn, getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    slots = getattr(type(value), "__slots__", None)
    if slots and type(value).__module__.startswith("comfy."):  # e.g. LTX's CompressedTimestep
        out = object.__new__(type(value))
        for name in slots:
            setattr(out, name, tree_map(fn, getattr(value, name)))
        return out
    return value


@dataclass
class ComfyBlocks:
    """Blocks ``blocks`` ((patch kind, index) in forward order) of the model ``spec`` describes."""

    index: int
    spec: ModelSpec
    blocks: tuple[tuple[str, int], ...]
    label: str

    def __post_init__(self) -> None:
        self.root = None
        self._patcher = None

    def __getstate__(self) -> dict:  # only the description travels; the modules are built where it runs
        return {k: v for k, v in self.__dict__.items() if k not in ("root", "_patcher", "_runs", "_config", "device")}

    def describe(self) -> str:
        return self.label

    @property
    def arch(self) -> Any:
        return BY_NAME[self.spec.arch]

    def _attr(self, kind: str) -> str:
        return next(bl.attr for bl in self.arch.lists if bl.kind == kind)

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(f"{self._attr(kind)}.{i}." for kind, i in self.blocks)

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        """ComfyUI's diffusion model on the meta device, built as ``BaseModel.__init__`` builds it
        (same constructor, same operations for this device); only this range's blocks are kept."""
        if self.spec.source is not None:
            self.spec.source.activate()
        self.device = device
        self._config = self.spec.model_config()
        dm = self._config.get_model({}, "", device=torch.device("meta")).diffusion_model
        self.root = torch.nn.Module()
        self.root.diffusion_model = torch.nn.Module()  # key names as in the ComfyUI process (LoRA seeds)
        self._runs = []
        for kind, i in self.blocks:
            attr = self._attr(kind)
            if not hasattr(self.root.diffusion_model, attr):
                setattr(self.root.diffusion_model, attr, torch.nn.ModuleDict())
            block = getattr(dm, attr)[i]
            for m in block.modules():  # ComfyUI's quantized Linear loads its weights to the device it was
                kw = getattr(m, "factory_kwargs", None)  # built on: what a model built on the CPU records
                if isinstance(kw, dict) and str(kw.get("device")) == "meta":
                    kw["device"] = None
            getattr(self.root.diffusion_model, attr)[str(i)] = block
            self._runs.append((kind, i, block))

    def read_checkpoint(self, path: str) -> dict[str, torch.Tensor]:
        return read_blocks(path, self.spec, self.prefixes, self._config)

    def save_shard(self, sd: dict[str, torch.Tensor], path: str) -> None:
        from mesh_ray.models.safetensors_io import write_atomic

        write_atomic(sd, path, {SHARD_MARK: "1"})

    def install(self, sd: dict[str, torch.Tensor]) -> None:
        for kind, i, block in self._runs:
            prefix = f"{self._attr(kind)}.{i}."
            own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            block.to_empty(device="cpu")  # then loaded by copy, as ComfyUI loads a model built on the CPU
            missing, _ = block.load_state_dict(own, strict=False)
            if missing:
                raise StageError(f"stage {self.index} ({self.label}): the checkpoint lacks {len(missing)} tensors of "
                                 f"{kind} {i} such as {prefix}{missing[0]}: it does not match the model ComfyUI loaded; "
                                 f"load the same file in ComfyUI")
        self._patcher = None

    def to_device(self, device: torch.device, blocks: bool) -> None:
        if blocks:
            self.root.to(device)

    def module(self) -> torch.nn.Module:
        return self.root

    def weight_bytes(self) -> int:
        import comfy.model_management

        return int(comfy.model_management.module_size(self.root))

    def prepare_consts(self, consts: dict[str, Any]) -> dict[str, Any]:
        return tree_map(lambda t: t.to(self.device), consts)

    def run(self, state: Streams, cond: dict, consts: dict[str, Any]) -> Streams:
        """This range on ``state`` with the step's values per block kind (``cond``) and the generation's
        ``consts``; each stream keeps the dtype it had in the ComfyUI process."""
        arch, dtypes = self.arch, state.meta.get("dtypes", {})
        # A copy per stream: ComfyUI's blocks add into their inputs in place, and a received tensor may
        # still sit in Ray's read-only buffer.
        streams = {k: v.to(self.device, getattr(torch, dtypes.get(k, str(v.dtype).removeprefix("torch."))), copy=True)
                   for k, v in state.tensors.items()}
        step = tree_map(lambda t: t.to(self.device), cond)
        current = None
        for kind, i, block in self._runs:
            values = {**consts, **step[kind]}
            if kind != current:
                streams, current = arch.enter(kind, streams, values), kind
            streams = arch.run_block(block, kind, streams, values, block_options(values["to"], i))
        return Streams(streams, {"dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in streams.items()}})

    def out_plan(self, out: LinkPlan) -> LinkPlan:
        return out

    def patch_weights(self, patches: Any, backups: dict[str, torch.Tensor]) -> int:
        """ComfyUI's weight patches (``ModelPatcher.patches`` entries for this range's keys) applied by
        ComfyUI's own ``ModelPatcher`` (static patching, stochastic rounding seeded by the key name),
        after restoring the weights the previous set changed."""
        import comfy.model_patcher

        if self._patcher is not None:
            self._patcher.unpatch_model(self.device)
            self._patcher = None
        if not patches:
            return 0
        p = comfy.model_patcher.ModelPatcher(self.root, load_device=self.device, offload_device=self.device)
        p.patches = {k: list(v) for k, v in patches.items()}
        p.load(self.device, full_load=True)
        self._patcher = p
        return len(p.patches)


__all__ = ["ComfyBlocks", "ModelSpec", "SHARD_MARK", "read_blocks", "tree_map"]
