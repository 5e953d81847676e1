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


class SamplerRun:
    """One image's (or one batch's) Euler sampling: the latent, its inputs per step, the update.

    ``generate`` and ``mesh_ray.split.pipeline.generate_many`` both drive this, so one image sampled
    alone or among many takes exactly the same arithmetic.
    """

    def __init__(self, config: FluxConfig, device: torch.device, dtype: torch.dtype, txt: torch.Tensor,
                 y: torch.Tensor | None = None, *, width: int = 1024, height: int = 1024, steps: int = 20,
                 seed: int = 0, guidance: float = 3.5):
        self.config, self.width, self.height, self.steps = config, width, height, steps
        b = txt.shape[0]
        noise = initial_noise(config, b, height, width, seed)
        self.img = pack_latent(noise).to(device, dtype)
        self.img_ids, self.txt_ids = position_ids(config.arch, b, height // 16, width // 16, txt.shape[1], device=device)
        self.txt = txt.to(device, dtype)
        self.y = y.to(device, dtype) if y is not None else None
        self.g = torch.full((b,), guidance, device=device, dtype=dtype) if config.guidance_embed else None
        self.ts = schedule(config, steps, self.img.shape[1])
        self.step = 0
        self.options = {"mesh_generation": uuid.uuid4().hex}  # per-generation constants are cached under this

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def inputs(self) -> tuple:
        """The forward's arguments for the current step (img, img_ids, txt, txt_ids, t, y, guidance)."""
        t_vec = torch.full((self.img.shape[0],), self.ts[self.step], device=self.img.device, dtype=self.img.dtype)
        return self.img, self.img_ids, self.txt, self.txt_ids, t_vec, self.y, self.g

    def advance(self, pred: torch.Tensor) -> None:
        """One Euler step with the model's predicted velocity."""
        self.img = self.img + (self.ts[self.step + 1] - self.ts[self.step]) * pred
        self.step += 1

    def latent(self) -> torch.Tensor:
        """The latent [B, C, height/8, width/8] (fp32, CPU)."""
        return unpack_tokens(self.img.float().cpu(), self.height // 8, self.width // 8)


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
    device, dtype = _device_dtype(model)
    run = SamplerRun(config or model.config, device, dtype, txt, y, width=width, height=height, steps=steps,
                     seed=seed, guidance=guidance)
    for _ in tqdm(range(steps), desc="sampling", disable=not progress, unit="step", leave=False):
        run.advance(model(*run.inputs(), transformer_options=run.options))
        if callback is not None:
            callback(run.step, steps, run.img)
    return run.latent()


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
