"""Architecture adapters: which ComfyUI DiTs a split runs, told apart from the MODEL input.

One adapter per model family (``base.Arch``): FLUX.1, FLUX.2, LTX 2.x (LTXAV), Wan 2.1/2.2 and
Qwen-Image.  ``detect`` picks it from the model's ``unet_config["image_model"]`` and the exact class
of its diffusion model (a subclass such as Wan VACE calls more per block: not supported).
"""

from __future__ import annotations

from typing import Any

from mesh_ray.errors import ConfigError

from .base import Arch, BlockList, Capture, Unsliceable, block_options
from .flux import Flux, Flux2
from .ltxav import LTXAV
from .qwen import QwenImage
from .wan import Wan

ARCHS: tuple[Arch, ...] = (Flux(), Flux2(), LTXAV(), Wan(), QwenImage())
BY_NAME = {a.name: a for a in ARCHS}


def supported() -> str:
    """The supported architectures, for messages."""
    return ", ".join(a.title for a in ARCHS)


def detect(model: Any) -> Arch:
    """The adapter for a ComfyUI MODEL, or a one-line ConfigError naming what is supported."""
    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    config = getattr(base, "model_config", None)
    image_model = (getattr(config, "unet_config", None) or {}).get("image_model")
    cls = f"{type(dm).__module__}.{type(dm).__qualname__}"
    for arch in ARCHS:
        if image_model in arch.image_models and cls == arch.model_class:
            return arch
    what = f"{type(config).__name__} ({type(dm).__name__})" if dm is not None else type(model).__name__
    raise ConfigError(f"Mesh Split Model cannot split a {what} model: it splits {supported()}; load one of those "
                      f"into its model input, or run this model unsplit")


__all__ = ["ARCHS", "Arch", "BY_NAME", "BlockList", "Capture", "Unsliceable", "block_options", "detect", "supported"]
