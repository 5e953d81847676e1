"""The LoRA patches a ComfyUI MODEL carries for its remote blocks, as a mesh-ray ``LoraSet``.

LoraLoader / LoraLoaderModelOnly add weight patches to the ModelPatcher; for the blocks that run on
stages they are converted here (ComfyUI's ``lora`` with alpha/mid, ``loha``, ``lokr`` and plain
``diff`` patches, offsets included) and applied there by ``mesh_ray.models.lora`` with ComfyUI's math.
"""

from __future__ import annotations

from typing import Any

from mesh_ray.errors import ConfigError
from mesh_ray.models.lora import LoraSet, Patch
from mesh_ray.models.blocks import BlockRange

PREFIX = "diffusion_model."


def _patch(v: Any, strength: float, offset: Any, key: str) -> Patch:
    off = tuple(offset) if offset is not None else None
    name = getattr(v, "name", None)
    if name is not None:  # a comfy.weight_adapter adapter
        w = list(v.weights)
        if name == "lora":
            up, down, alpha, mid, dora, reshape = w[:6]
            tensors = {"up": up, "down": down, **({"mid": mid} if mid is not None else {})}
        elif name == "loha":
            w1a, w1b, alpha, w2a, w2b, t1, t2, dora = w[:8]
            tensors = {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b,
                       **({"t1": t1, "t2": t2} if t1 is not None else {})}
            reshape = None
        elif name == "lokr":
            w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora = w[:9]
            named = {"w1": w1, "w2": w2, "w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b, "t2": t2}
            tensors = {k: t for k, t in named.items() if t is not None}
            reshape = None
        else:
            raise ConfigError(f"LoRA patch type {name!r} on {key} cannot run on a remote block (lora, loha, lokr "
                              f"can): keep that block local or set forward_loras off")
        if dora is not None or reshape is not None:
            raise ConfigError(f"{key} has a DoRA/reshaped LoRA patch, which remote blocks do not apply: keep that "
                              f"block local or set forward_loras off")
        a = float(alpha) if alpha is not None else None
        return Patch(name, {k: t.detach().cpu() for k, t in tensors.items()}, a, float(strength), off)
    if isinstance(v, tuple) and (len(v) == 1 or (len(v) == 2 and v[0] == "diff")):
        diff = v[0] if len(v) == 1 else v[1][0]
        return Patch("diff", {"diff": diff.detach().cpu()}, None, float(strength), off)
    raise ConfigError(f"a weight patch on {key} ({type(v).__name__}) cannot run on a remote block: keep that block "
                      f"local or set forward_loras off")


def remote_lora_set(model: Any, ranges: list[BlockRange]) -> LoraSet:
    """The ModelPatcher's weight patches on the blocks in ``ranges``, in mesh-ray's form."""
    prefixes = tuple(PREFIX + p for r in ranges for p in r.keys_prefixes())
    out: LoraSet = {}
    for key, patches in model.patches.items():
        if not key.startswith(prefixes):
            continue
        for strength, v, strength_model, offset, function in patches:
            if strength_model != 1.0 or function is not None:
                raise ConfigError(f"a weight patch on {key} scales or transforms the base weight, which remote "
                                  f"blocks do not apply: keep that block local or set forward_loras off")
            out.setdefault(key[len(PREFIX):], []).append(_patch(v, strength, offset, key))
    return out
