"""Latent -> PNG without a VAE: a quick look at what the sampler made (like ComfyUI's latent preview)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def latent_to_rgb(latent: torch.Tensor, scale: int = 8) -> np.ndarray:
    """[C, h, w] latent -> uint8 [h*scale, w*scale, 3]: the first three channels, each stretched to 0..255."""
    x = latent[:3].float()
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).round().clamp(0, 255).to(torch.uint8)
    img = x.permute(1, 2, 0).numpy()
    return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else img


def save_png(pixels: np.ndarray, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (temp name, then rename) with text metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path
