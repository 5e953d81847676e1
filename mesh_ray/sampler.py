"""Flow-matching Euler sampling with the FLUX time shift, over any callable with the Flux forward."""

from __future__ import annotations

import math
import uuid
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from mesh_ray.errors import ConfigError
from mesh_ray.models.flux import FluxConfig, pack_latent, position_ids, unpack_tokens


def _time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical shift: linear in sequence length, interpolated in step count."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def schedule(config: FluxConfig, num_steps: int, image_seq_len: int, shift: bool | None = None) -> list[float]:
    """Timesteps 1 -> 0 (num_steps + 1 values).  FLUX.1: mu linear in the sequence length between
    (256, 0.5) and (4096, 1.15), no shift for schnell (no guidance embed); FLUX.2: empirical mu."""
    if num_steps < 1:
        raise ConfigError(f"steps must be at least 1, got {num_steps}")
    ts = torch.linspace(1, 0, num_steps + 1)
    if shift is None:
        shift = config.arch == "flux2" or config.guidance_embed
    if not shift:
        return ts.tolist()
    if config.arch == "flux2":
        mu = flux2_mu(image_seq_len, num_steps)
    else:
        m = (1.15 - 0.5) / (4096 - 256)
        mu = m * image_seq_len + (0.5 - m * 256)
    return _time_shift(mu, 1.0, ts).tolist()


def initial_noise(config: FluxConfig, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian latent [B, C, height/8, width/8] (on the CPU, so seeds match across devices)."""
    if height % 16 or width % 16:
        raise ConfigError(f"image size {width}x{height} is not a multiple of 16: use e.g. {width // 16 * 16}x{height // 16 * 16}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.latent_channels, height // 8, width // 8, generator=gen)


@torch.inference_mode()
def generate(model: Callable[..., torch.Tensor], txt: torch.Tensor, y: torch.Tensor | None = None, *,
             width: int = 1024, height: int = 1024, steps: int = 20, seed: int = 0, guidance: float = 3.5,
             progress: bool = True, callback: Callable[[int, int, torch.Tensor], Any] | None = None,
             config: FluxConfig | None = None) -> torch.Tensor:
    """Sample a latent [B, C, height/8, width/8] from text conditioning.

    ``model`` is a ``Flux`` or a ``SplitModel`` (anything with the Flux forward and a ``config``);
    ``txt`` [B, L, context_in_dim] text embeddings, ``y`` [B, vec_in_dim] pooled vector (FLUX.1).
    ``callback(step, steps, latent_tokens)`` runs after every step.
    """
    cfg = config or model.config
    b = txt.shape[0]
    noise = initial_noise(cfg, b, height, width, seed)
    h_tok, w_tok = height // 16, width // 16
    device, dtype = _device_dtype(model)
    img = pack_latent(noise).to(device, dtype)
    img_ids, txt_ids = position_ids(cfg.arch, b, h_tok, w_tok, txt.shape[1], device=device)
    txt = txt.to(device, dtype)
    y = y.to(device, dtype) if y is not None else None
    g = torch.full((b,), guidance, device=device, dtype=dtype) if cfg.guidance_embed else None
    ts = schedule(cfg, steps, img.shape[1])
    opts = {"mesh_generation": uuid.uuid4().hex}
    for i, (t_curr, t_prev) in enumerate(tqdm(list(zip(ts[:-1], ts[1:])), desc="sampling", disable=not progress,
                                              unit="step", leave=False)):
        t_vec = torch.full((b,), t_curr, device=device, dtype=dtype)
        pred = model(img, img_ids, txt, txt_ids, t_vec, y, g, transformer_options=opts)
        img = img + (t_prev - t_curr) * pred
        if callback is not None:
            callback(i + 1, steps, img)
    return unpack_tokens(img.float().cpu(), height // 8, width // 8)


def _device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    """Where the model's inputs must live: a module's parameters, or a SplitModel's caller side."""
    if isinstance(model, torch.nn.Module):
        p = next(p for p in model.parameters() if p.device.type != "meta")
        return p.device, p.dtype
    return model.device, model.dtype


def random_conditioning(config: FluxConfig, batch: int = 1, txt_len: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Seeded stand-in text embeddings (and pooled vector) with the model's widths: no text encoder needed."""
    gen = torch.Generator().manual_seed(seed)
    txt = torch.randn(batch, txt_len, config.context_in_dim, generator=gen)
    y = torch.randn(batch, config.vec_in_dim, generator=gen) if config.vec_in_dim else None
    return txt, y
