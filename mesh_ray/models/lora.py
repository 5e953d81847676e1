"""LoRA-family weight patches for FLUX blocks: read from files, applied and removed (no Ray here).

A ``LoraSet`` maps a weight name in the BFL layout (``double_blocks.3.img_attn.qkv.weight``) to its
patches.  Each ``Patch`` is plain tensors (``lora`` up/down/mid, ``loha``, ``lokr``, ``diff``), an
alpha, a strength and an optional slice (``offset``: dim, start, size) of the weight it adds to.
The math is ComfyUI's (``comfy/weight_adapter``): same float32 intermediate, same order, so a
stage patched here equals ComfyUI's patched weights.  Stages keep the unpatched weights of every
key they touched, so changing or removing a set restores the base exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable

import torch
from safetensors import safe_open

from mesh_ray.errors import CheckpointError, ConfigError
from mesh_ray.models.blocks import BlockRange

KINDS = ("lora", "loha", "lokr", "diff")


@dataclass
class Patch:
    """One patch on one weight: ``weight[offset] += strength * alpha_scale * delta(tensors)``."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    strength: float = 1.0
    offset: tuple[int, int, int] | None = None


LoraSet = dict[str, list[Patch]]


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a.float(), b.float())


def _cp(t: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j k l, j r, i p -> p r k l", t.float(), b.float(), a.float())


def delta(p: Patch, shape: torch.Size) -> torch.Tensor:
    """The float32 update a patch adds (strength and alpha applied), shaped like the target."""
    t = p.tensors
    if p.kind == "diff":
        return p.strength * t["diff"].float().reshape(shape)
    if p.kind == "lora":
        up, down = t["up"].float(), t["down"].float()
        scale = p.alpha / down.shape[0] if p.alpha is not None else 1.0
        if "mid" in t:  # locon mid weights, as ComfyUI composes them
            mid = t["mid"].float()
            final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                            mid.transpose(0, 1).flatten(start_dim=1)).reshape(final).transpose(0, 1)
        diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(shape)
    elif p.kind == "loha":
        scale = p.alpha / t["w1b"].shape[0] if p.alpha is not None else 1.0
        if "t1" in t:
            m1, m2 = _cp(t["t1"], t["w1b"], t["w1a"]), _cp(t["t2"], t["w2b"], t["w2a"])
        else:
            m1, m2 = _mm(t["w1a"], t["w1b"]), _mm(t["w2a"], t["w2b"])
        diff = (m1 * m2).reshape(shape)
    elif p.kind == "lokr":
        dim = None
        if "w1" in t:
            w1 = t["w1"].float()
        else:
            dim, w1 = t["w1b"].shape[0], _mm(t["w1a"], t["w1b"])
        if "w2" in t:
            w2 = t["w2"].float()
        else:
            dim = t["w2b"].shape[0]
            w2 = _cp(t["t2"], t["w2b"], t["w2a"]) if "t2" in t else _mm(t["w2a"], t["w2b"])
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        scale = p.alpha / dim if p.alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(shape)
    else:
        raise ConfigError(f"unknown LoRA patch kind {p.kind!r}: use one of {', '.join(KINDS)}")
    return (p.strength * scale) * diff


def patched(base: torch.Tensor, patches: list[Patch]) -> torch.Tensor:
    """``base`` with the patches applied in order (float32 math, cast back to base's dtype)."""
    w = base.detach().to(torch.float32, copy=True)
    for p in patches:
        target = w.narrow(*p.offset) if p.offset else w
        target += delta(p, target.shape)
    return w.to(base.dtype)


def digest(lset: LoraSet) -> str:
    """Content hash of a set (names, kinds, alphas, strengths, offsets, tensor bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(lset):
        for p in lset[key]:
            h.update(json.dumps([key, p.kind, p.alpha, p.strength, p.offset]).encode())
            for name in sorted(p.tensors):
                t = p.tensors[name].detach().contiguous().cpu()
                h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def subset(lset: LoraSet, ranges: Iterable[BlockRange]) -> LoraSet:
    """The patches of the blocks in ``ranges`` (what one stage needs)."""
    prefixes = tuple(p for r in ranges for p in r.keys_prefixes())
    return {k: v for k, v in lset.items() if k.startswith(prefixes)}


def apply(module: torch.nn.Module, lset: LoraSet, backups: dict[str, torch.Tensor]) -> int:
    """Make ``module``'s weights base + ``lset``: restore keys no longer patched, patch the rest.

    ``backups`` holds the base of every key patched so far (kept by the caller between calls).
    Returns how many weights are patched now.
    """
    params = dict(module.named_parameters())
    missing = sorted(set(lset) - set(params))
    if missing:
        raise ConfigError(f"LoRA patches {missing[0]} (and {len(missing) - 1} more), which this model does not have: "
                          f"the LoRA is for another model or layout")
    with torch.no_grad():
        for key in [k for k in backups if k not in lset]:
            params[key].copy_(backups.pop(key).to(params[key].device))
        for key, patches in lset.items():
            if key not in backups:
                backups[key] = params[key].detach().to("cpu", copy=True)
            params[key].copy_(patched(backups[key], patches).to(params[key].device))
    return len(lset)


# -- LoRA files: BFL/ComfyUI, kohya ``lora_unet_…`` and diffusers PEFT key layouts ---------------

_SUFFIXES = {
    "lora_up.weight": ("lora", "up"), "lora_down.weight": ("lora", "down"), "lora_mid.weight": ("lora", "mid"),
    "lora_B.weight": ("lora", "up"), "lora_A.weight": ("lora", "down"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w2": ("lokr", "w2"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"), "lokr_t2": ("lokr", "t2"), "diff": ("diff", "diff"),
}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")


def _diffusers_map(depth: int, num_single: int, hidden: int, mlp_hidden: int) -> dict[str, tuple[str, tuple | None]]:
    """diffusers FLUX module names -> (BFL weight name, slice of it)."""
    out: dict[str, tuple[str, tuple | None]] = {}
    for i in range(depth):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for j, n in enumerate(("to_q", "to_k", "to_v")):
            out[f"{d}attn.{n}"] = (f"{b}img_attn.qkv.weight", (0, j * hidden, hidden))
        for j, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{d}attn.{n}"] = (f"{b}txt_attn.qkv.weight", (0, j * hidden, hidden))
        for src, dst in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                         ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")):
            out[d + src] = (f"{b}{dst}.weight", None)
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for j, n in enumerate(("to_q", "to_k", "to_v")):
            out[f"{d}attn.{n}"] = (f"{b}linear1.weight", (0, j * hidden, hidden))
        out[f"{d}proj_mlp"] = (f"{b}linear1.weight", (0, 3 * hidden, mlp_hidden))
        out[f"{d}proj_out"] = (f"{b}linear2.weight", None)
        out[f"{d}norm.linear"] = (f"{b}modulation.lin.weight", None)
    return out


def read_lora(path: str | os.PathLike, strength: float, weight_names: Iterable[str], depth: int, num_single: int,
              hidden: int, mlp_hidden: int) -> LoraSet:
    """The block patches of one LoRA safetensors file (any of the three key layouts) at ``strength``.

    ``weight_names``: the model's block weight names (BFL layout).  Keys outside the blocks
    (embedders, final layer, text encoders) are skipped: they are not on stages.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"LoRA file not found: {path}: check the path")
    names = set(weight_names)
    kohya = {"lora_unet_" + n[: -len(".weight")].replace(".", "_"): n for n in names}
    diffusers = _diffusers_map(depth, num_single, hidden, mlp_hidden)
    groups: dict[tuple[str, tuple | None], dict] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                module, suffix = _split_key(key)
                if suffix is None:
                    continue
                target = _target(module, names, kohya, diffusers)
                if target is None:
                    continue
                g = groups.setdefault(target, {"tensors": {}, "kind": None, "alpha": None})
                if suffix == "alpha":
                    g["alpha"] = float(f.get_tensor(key).float().item())
                    continue
                kind, slot = _SUFFIXES[suffix]
                if g["kind"] not in (None, kind):
                    raise CheckpointError(f"{path}: {module} mixes {g['kind']} and {kind} tensors: the file is corrupt")
                g["kind"] = kind
                g["tensors"][slot] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise CheckpointError(f"{path} is not a readable safetensors LoRA ({e}): re-download it") from None
    out: LoraSet = {}
    for (name, offset), g in groups.items():
        if g["kind"] is None:
            continue
        out.setdefault(name, []).append(Patch(g["kind"], g["tensors"], g["alpha"], strength, offset))
    if not out:
        raise CheckpointError(f"{path} has no LoRA weights for this model's blocks: it is for another model or "
                              f"uses an unknown key layout (BFL/ComfyUI, kohya lora_unet_, diffusers PEFT)")
    return out


def _split_key(key: str) -> tuple[str, str | None]:
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, None


def _target(module: str, names: set[str], kohya: dict, diffusers: dict) -> tuple[str, tuple | None] | None:
    if module in kohya:
        return kohya[module], None
    for prefix in ("", *_PREFIXES):
        if prefix and not module.startswith(prefix):
            continue
        bare = module[len(prefix):]
        if bare + ".weight" in names:
            return bare + ".weight", None
        if bare in diffusers:
            return diffusers[bare]
    return None


def merge(sets: Iterable[LoraSet]) -> LoraSet:
    """Several LoRAs stacked: their patches per weight, in order."""
    out: LoraSet = {}
    for s in sets:
        for k, v in s.items():
            out.setdefault(k, []).extend(v)
    return out


__all__ = ["LoraSet", "Patch", "apply", "delta", "digest", "merge", "patched", "read_lora", "subset"]
