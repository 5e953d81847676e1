"""The MODEL a split node returns: a clone of the input whose remote blocks run on the stages.

* Remote blocks are swapped (an object patch of their lists) for weightless placeholders, so
  ComfyUI's model management never loads or counts their weights; after sampling the shared model
  gets its real lists back (other nodes see every block).  The input MODEL is untouched.
* ``patches_replace["dit"]`` entries run each remote chain once per block call: the entry of its
  first block sends the chain (``RemoteBlocks.run_chain``) and the rest pass the result through.
  A FLUX range from double into single blocks runs at the first single block (the double call is held).
* The remote blocks' weight patches (LoRAs before the node) leave the clone and go to the stages.
* What the ComfyUI process knows about the model for the stages: its config (``ModelSpec``), the
  checkpoint file it came from (0.20's ``cached_patcher_init``) when that file holds the blocks,
  and otherwise the blocks' base weights from memory.

ComfyUI is imported only inside functions: this module runs inside a ComfyUI process.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

import torch

from mesh_ray.digest import tensor_digest
from mesh_ray.errors import ConfigError, MeshError
from mesh_ray.models.blocks import BlockRange

from .archs import Arch, Capture
from .comfy_env import ComfySource
from .comfy_stage import ModelSpec
from .plan import Layout
from .split_remote import RemoteBlocks, leaves

MARK = "mesh_ray_split"  # transformer_options key marking a MODEL that is already split
PREFIX = "diffusion_model."
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def block_list(model: Any, attr: str) -> torch.nn.ModuleList:
    """The model's own block list ``attr``, even while a split clone's placeholders are applied
    (ComfyUI keeps the original in the shared backup)."""
    own = model.object_patches_backup.get(f"diffusion_model.{attr}")
    return own if own is not None else getattr(model.model.diffusion_model, attr)


def block_at(model: Any, prefix: str) -> torch.nn.Module:
    """The block under a state-dict prefix such as ``double_blocks.3.``."""
    attr, i = prefix.rstrip(".").rsplit(".", 1)
    return block_list(model, attr)[int(i)]


def layout_of(model: Any, arch: Arch) -> Layout:
    """The model's block lists and their lengths."""
    return Layout(tuple((bl.kind, bl.attr, bl.label, len(block_list(model, bl.attr))) for bl in arch.lists))


def compute_dtype(model: Any) -> str:
    """The dtype ComfyUI computes this model in: its activations travel in it."""
    base = model.model
    return _DTYPE_NAMES.get(getattr(base, "manual_cast_dtype", None) or base.get_dtype(), "float32")


def model_spec(model: Any, arch: Arch, source: ComfySource | None, file_prefix: str = "") -> ModelSpec:
    """The model's config as plain data for the stages, or a one-line ConfigError."""
    import comfy.supported_models
    import comfy.utils

    mc = model.model.model_config
    if getattr(mc, "custom_operations", None) is not None:
        raise ConfigError("this model was loaded with custom operations (e.g. a GGUF loader), which a stage cannot "
                          "rebuild: load it with ComfyUI's own loader (UNETLoader) to split it")
    if not hasattr(comfy.supported_models, type(mc).__name__):
        raise ConfigError(f"model config {type(mc).__name__} is not one of ComfyUI's own: a stage cannot rebuild it; "
                          f"load the model with ComfyUI's own loader")
    return ModelSpec(arch.name, type(mc).__name__, dict(mc.unet_config), mc.manual_cast_dtype,
                     getattr(mc, "quant_config", None),
                     None if hasattr(comfy.utils, "convert_old_quants") else getattr(mc, "scaled_fp8", None),
                     dict(mc.optimizations),
                     file_prefix, source)


def model_file(model: Any, prefixes: tuple[str, ...]) -> tuple[str | None, str]:
    """(the checkpoint file ComfyUI loaded this model from, its key prefix) when that file holds
    every remote block under ComfyUI's key names; (None, "") otherwise (then the blocks are shipped)."""
    init = getattr(model, "cached_patcher_init", None)  # 0.20: (loader, (path, ...)); 0.3.64 keeps none
    path = init[1][0] if init and len(init) > 1 and init[1] and isinstance(init[1][0], str) else None
    if not path or not os.path.isfile(path) or not path.endswith(".safetensors"):
        return None, ""
    from safetensors import safe_open

    import comfy.model_detection

    with safe_open(path, framework="pt", device="cpu") as f:
        keys = list(f.keys())
    detected = comfy.model_detection.unet_prefix_from_state_dict(dict.fromkeys(keys))
    prefix = detected if any(k.startswith(detected) for k in keys) else ""  # as load_diffusion_model strips it
    if not all(any(k.startswith(prefix + p) for k in keys) for p in prefixes):
        return None, ""  # e.g. a diffusers-layout file: ComfyUI renamed its keys
    return path, prefix


def weights_id(model: Any, path: str | None) -> Any:
    """What identifies the base weights the stages hold: the file (and its version), or the loaded model."""
    if path:
        st = os.stat(path)
        return (path, st.st_size, st.st_mtime_ns)
    return ("memory", id(model.model))


def memory_shard(model: Any) -> Callable[[tuple[str, ...]], dict[str, torch.Tensor]]:
    """A reader of blocks' base weights (without weight patches ComfyUI applied in place) from the
    loaded model, for a model that came from no file a stage can read."""
    def read(prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        base = model.model
        patchers = [p for p in (getattr(base, "current_patcher", None), model) if p is not None]
        out = {}
        for prefix in prefixes:
            for name, t in block_at(model, prefix).state_dict().items():
                key = f"{PREFIX}{prefix}{name}"
                backup = next((p.backup[key] for p in patchers if key in p.backup), None)
                t = backup.weight if backup is not None else t
                if type(t) not in (torch.Tensor, torch.nn.Parameter):
                    raise ConfigError(f"{key} is held as {type(t).__name__} in memory, which cannot be shipped to a "
                                      f"stage: load the model from its file with UNETLoader so stages read it there")
                out[prefix + name] = t.detach().to("cpu")
        return out
    return read


def remote_patches(model: Any, prefixes: tuple[str, ...]) -> dict[str, list]:
    """The ModelPatcher's weight patches on the remote blocks (ComfyUI's own entries, as they are)."""
    full = tuple(PREFIX + p for p in prefixes)
    return {k: list(v) for k, v in model.patches.items() if k.startswith(full)}


def patch_digest(entries: dict[str, list]) -> str | None:
    """A content hash of weight-patch entries (their tensors, strengths, adapter kinds); None when empty."""
    if not entries:
        return None
    tensors, text = [], []
    for path, leaf in leaves(entries):
        if isinstance(leaf, torch.Tensor):
            tensors.append((path, leaf))
        else:
            text.append(f"{path}={leaf!r}")
    meta = torch.frombuffer(bytearray("\n".join(text).encode()), dtype=torch.uint8)
    return tensor_digest([*tensors, ("meta", meta)], 16)


class RemotePlaceholder(torch.nn.Module):
    """Stands in for a block that runs on a stage: no weights, so ComfyUI loads nothing for it."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise MeshError(f"{self.label} runs on a mesh-ray stage but was called directly: a node after Mesh Split "
                        f"Model replaced ComfyUI's block patches; place it before Mesh Split Model")


class RestoreBlocks:
    """ON_CLEANUP callback: undo the placeholder object patch on the shared model (ComfyUI applies it
    again when it loads the clone)."""

    def __init__(self, attrs: tuple[str, ...]):
        self.attrs = attrs

    def __call__(self, patcher: Any) -> None:
        import comfy.utils

        for attr in self.attrs:
            k = f"diffusion_model.{attr}"
            if k in patcher.object_patches and k in patcher.object_patches_backup:
                comfy.utils.set_attr(patcher.model, k, patcher.object_patches_backup.pop(k))


def refuse_control(executor: Any, x: Any, t: Any, c_concat: Any, c_crossattn: Any, control: Any,
                   transformer_options: Any, **kwargs: Any) -> Any:
    """APPLY_MODEL wrapper: a ControlNet adds to the activations between blocks in this process, which
    a remote range would skip: one line instead of a wrong image."""
    if control is not None:
        raise ConfigError("a ControlNet reaches a split model: its additions run between blocks in this ComfyUI "
                          "process and cannot reach remote blocks; apply the ControlNet to an unsplit model")
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def chain_entries(remote: RemoteBlocks, chain_no: int, blocks: list[tuple[str, int]]) -> dict:
    """``patches_replace["dit"]`` entries for one remote chain of ``blocks`` ((kind, index), in order)."""
    arch = remote.arch
    kinds = [k for k, _ in blocks]
    run_at, hold = blocks[0], None
    if len(set(kinds)) > 1:  # FLUX double -> single: run where the single blocks' inputs exist
        run_at, hold = next(b for b in blocks if b[0] != kinds[0]), blocks[0]
    held: list[Capture] = []

    def holder(args: dict, extra: dict) -> dict:
        held[:] = [arch.capture(hold[0], args, extra)]
        return arch.passthrough(hold[0], args)

    def runner(args: dict, extra: dict) -> dict:
        cap = arch.capture(run_at[0], args, extra)
        if hold is not None:
            if not held:
                raise MeshError(f"{hold[0]} {hold[1]} did not run before {run_at[0]} {run_at[1]}: this forward "
                                f"skips blocks; keep the split inside one block list")
            first = held.pop()
            cap = Capture(first.streams, {**first.step, **cap.step}, first.consts)
        out = remote.run_chain(chain_no, cap, next(iter(cap.streams.values())).device)
        return arch.result(kinds[-1], out)

    def passthrough(kind: str) -> Callable[[dict, dict], dict]:
        return lambda args, extra: arch.passthrough(kind, args)

    entries = {b: passthrough(b[0]) for b in blocks}
    if hold is not None:
        entries[hold] = holder
    entries[run_at] = runner
    return entries


def split_clone(model: Any, remote: RemoteBlocks, ranges: list[BlockRange], chains: list[list[tuple[str, int]]]) -> Any:
    """A clone of ``model`` whose ``ranges`` run through ``remote``; ``model`` stays as it was."""
    import comfy.patcher_extension as pe

    layout = remote.layout
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    mine = {(kind, i) for r in ranges for kind, _, i in (layout.locate(b) for b in r)}
    clone = model.clone()
    for kind, attr, _, _ in layout.lists:
        idx = sorted(i for k, i in mine if k == kind)
        if not idx:
            continue
        taken = [i for i in idx if (kind, i) in replace]
        if taken:
            raise ConfigError(f"another node already replaces {kind} {taken[0]} of this model: keep that block local "
                              f"or place that node after Mesh Split Model only for local blocks")
        clone.add_object_patch(f"diffusion_model.{attr}", torch.nn.ModuleList(
            [RemotePlaceholder(f"{kind} {i}") if i in idx else m for i, m in enumerate(block_list(model, attr))]))
    for chain_no, blocks in enumerate(chains):
        for (kind, i), fn in chain_entries(remote, chain_no, blocks).items():
            clone.set_model_patch_replace(fn, "dit", kind, i)
    clone.add_callback(pe.CallbacksMP.ON_CLEANUP, RestoreBlocks(tuple(a for _, a, _, _ in layout.lists)))
    clone.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, MARK, refuse_control)
    clone.model_options["transformer_options"][MARK] = {"key": remote.key, "plan": remote.plan}
    prefixes = tuple(p for r in ranges for p in layout.prefixes(r))
    for k in [k for k in clone.patches if k.startswith(tuple(PREFIX + p for p in prefixes))]:
        del clone.patches[k]  # they run on the stages instead
    clone.patches_uuid = uuid.uuid4()  # its own weight state: switching to it unloads the full model
    remote_bytes = sum(t.numel() * t.element_size() for p in prefixes for t in block_at(model, p).state_dict().values())
    clone.size = max(0, model.model_size() - remote_bytes)
    return clone


__all__ = ["MARK", "RemotePlaceholder", "block_at", "block_list", "chain_entries", "compute_dtype", "layout_of", "memory_shard",
           "model_file", "model_spec", "patch_digest", "remote_patches", "split_clone", "weights_id"]
