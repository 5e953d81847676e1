"""LoRAs on a split: read the files once, patch the local blocks here and ship each stage its own
blocks' patches (``SplitModel.set_loras``); the patch math is ``mesh_ray.models.lora``."""

from __future__ import annotations

import os

from mesh_ray.models.flux import build
from mesh_ray.models.lora import LoraSet, apply, digest, merge, read_lora, subset


def send(split, lset: LoraSet, dg: str | None) -> None:
    """Apply ``lset`` on every remote stage of ``split`` (each gets only its blocks' patches)."""
    split.group.send_patches(lambda seg: subset(lset, [seg.range]), dg)


def set_split_loras(split, loras: list[tuple[str | os.PathLike, float]]) -> str | None:
    """``SplitModel.set_loras``: read the files, patch the local blocks here and the rest on the stages."""
    cfg = split.config
    names = [k for k in build(cfg, "meta").state_dict() if k.startswith(("double_blocks.", "single_blocks."))]
    lset = merge(read_lora(p, float(s), names, cfg.depth, cfg.depth_single_blocks, cfg.hidden_size, cfg.mlp_hidden)
                 for p, s in loras)
    dg = digest(lset) if lset else None
    local = [seg.range for seg in split.segments if seg.spec.local]
    loaded = not any(p.is_meta for r in local for b in r for p in split.model.block(b).parameters())
    if local and loaded:  # a split made with load_local=False (inside ComfyUI) has no local weights here
        apply(split.model, subset(lset, local), split.__dict__.setdefault("_lora_backups", {}))
    send(split, lset, dg)
    return dg


__all__ = ["send", "set_split_loras"]
