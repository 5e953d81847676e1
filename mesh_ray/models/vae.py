"""FLUX.1 / FLUX.2 VAE decoder with the BFL ``ae.safetensors`` key layout (decoder only).

Reads top to bottom: config and presets, the blocks (resnet, attention, upsample), the decoder,
the model that adds the latent pre-processing of each family, then checkpoint inspection,
slim loading and random checkpoints.

Latents (the space the sampler works in, BFL convention):
  * FLUX.1: ``[B, 16, H/8, W/8]``; decoded as ``decoder(z / 0.3611 + 0.1159)``.
  * FLUX.2: ``[B, 128, H/16, W/16]`` (2x2 patches of the 32-channel latent, normalised by the
    batch-norm running statistics ``bn.running_mean/var``); ``[B, 32, H/8, W/8]`` (the same
    latent un-patchified, as ``mesh_ray.models.flux.unpack_tokens`` returns it) is accepted too.
  * ``raw=True`` skips the scale/shift or batch-norm step (the latent is already in the VAE's own
    space, as ComfyUI's LATENT is for FLUX.1).

Images come back as ``[B, H, W, C]`` float in 0..1 (the ComfyUI convention).

Tiled decoding (``decode(latent, tile=512, overlap=64)``, pixels): the decoder's input convs and
middle block (which holds the only attention) run on the whole latent, so attention stays exact;
the up-sampling path runs on overlapping tiles (each with ``overlap`` pixels of extra context)
blended with linear ramps.  Group norms inside a
tile see the tile's statistics, so the result differs from the full decode by a small amount:
``TILED_TOLERANCE`` states the bound that the tests check.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn

from mesh_ray.errors import CheckpointError, ConfigError
from mesh_ray.models.safetensors_io import load_tensors, read_header, tensor_bytes, write_atomic

# --------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------

VAE_CONFIG_METADATA_KEY = "mesh_ray.vae_config"
PREFIXES = ("", "vae.", "first_stage_model.")  # ae.safetensors has none; some bundles add one
FLUX1_SCALE, FLUX1_SHIFT = 0.3611, 0.1159

# Tiled vs full decode, on 0..1 images, with overlap >= 64 px: mean absolute difference <= 0.01
# and max absolute difference <= 0.15 (checked in tests/test_vae_model.py; over 24 seeded
# random-weight cases we measured mean <= 0.006 and max <= 0.125 -- the max is a few seam
# pixels).  A tile that covers the whole image gives exactly the full decode.
TILED_TOLERANCE = {"mean_abs": 0.01, "max_abs": 0.15, "min_overlap_px": 64}


class VaeConfig(BaseModel):
    """Hyperparameters of a FLUX VAE decoder.

    Fields (type, default):
      arch (``"flux1" | "flux2"``, required): FLUX.1 (scale/shift latent) or FLUX.2 (2x2
          patchified latent normalised by batch-norm running statistics).
      z_channels (int, required): channels of the decoder input (16 FLUX.1, 32 FLUX.2).
      ch (int, 128): base width; ch_mult (list[int], [1, 2, 4, 4]): width per resolution level.
      num_res_blocks (int, 2): resnet blocks per level in the encoder (the decoder has one more).
      out_ch (int, 3): image channels.
      num_groups (int, 32): group-norm groups (every width must be divisible by it).
      post_quant_conv (bool, False): a 1x1 conv in front of the decoder (FLUX.2 has one).
      scale_factor (float, 1.0), shift_factor (float, 0.0): FLUX.1 latent ``z / scale + shift``.
      patch (int, 2): FLUX.2 latent patch size; bn_eps (float, 1e-4): FLUX.2 batch-norm epsilon.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["flux1", "flux2"]
    z_channels: int
    ch: int = 128
    ch_mult: list[int] = [1, 2, 4, 4]
    num_res_blocks: int = 2
    out_ch: int = 3
    num_groups: int = 32
    post_quant_conv: bool = False
    scale_factor: float = 1.0
    shift_factor: float = 0.0
    patch: int = 2
    bn_eps: float = 1e-4

    @model_validator(mode="after")
    def _check(self) -> "VaeConfig":
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.num_groups]
        if bad:
            raise ValueError(f"widths {bad} are not divisible by num_groups {self.num_groups}")
        if not self.ch_mult or self.num_res_blocks < 0:
            raise ValueError("ch_mult must be non-empty and num_res_blocks >= 0")
        return self

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel of the decoder input (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the sampler-space latent (FLUX.1 16, FLUX.2 128)."""
        return self.z_channels * self.patch**2 if self.arch == "flux2" else self.z_channels

    @property
    def accepted_channels(self) -> tuple[int, ...]:
        return (self.latent_channels, self.z_channels) if self.arch == "flux2" else (self.z_channels,)

    def pixel_scale(self, channels: int) -> int:
        """Pixels per latent pixel for a latent with ``channels`` channels."""
        if self.arch == "flux2" and channels == self.latent_channels:
            return self.downscale * self.patch
        return self.downscale

    def check_latent(self, shape: tuple[int, ...] | torch.Size) -> None:
        """One-line ConfigError when a latent of this shape cannot be decoded by this VAE."""
        shape = tuple(shape)
        want = " or ".join(f"[B, {c}, h, w]" for c in self.accepted_channels)
        if len(shape) != 4:
            fix = "add a batch dimension with latent[None]" if len(shape) == 3 else "pass a 4-d latent"
            raise ConfigError(f"latent has rank {len(shape)} (shape {shape}) but the {self.arch} VAE decodes {want}: {fix}")
        if shape[1] not in self.accepted_channels:
            raise ConfigError(f"latent has {shape[1]} channels (shape {shape}) but the {self.arch} VAE decodes {want}: "
                              f"use the VAE that matches the diffusion model ({'FLUX.1: 16' if shape[1] == 16 else 'FLUX.2: 128'} channels)")
        if shape[0] < 1 or shape[2] < 1 or shape[3] < 1:
            raise ConfigError(f"latent shape {shape} is empty: pass at least one latent of at least 1x1")
        if self.arch == "flux2" and shape[1] == self.z_channels and (shape[2] % self.patch or shape[3] % self.patch):
            raise ConfigError(f"un-patchified FLUX.2 latent {shape} needs an even height and width: "
                              f"use an image size divisible by 16")


_FLUX1 = dict(arch="flux1", z_channels=16, scale_factor=FLUX1_SCALE, shift_factor=FLUX1_SHIFT)
_FLUX2 = dict(arch="flux2", z_channels=32, post_quant_conv=True)
_TINY = dict(ch=8, ch_mult=[1, 1, 2, 2], num_res_blocks=1, num_groups=4)

VAE_PRESETS: dict[str, VaeConfig] = {
    "flux1": VaeConfig(**_FLUX1),
    "flux2": VaeConfig(**_FLUX2),
    # Few channels, same structure and 8x upsampling: for tests and the demo.
    "tiny-flux1": VaeConfig(**_FLUX1, **_TINY),
    "tiny-flux2": VaeConfig(**_FLUX2, **_TINY),
}
VAE_PRESETS["tiny"] = VAE_PRESETS["tiny-flux1"]


def vae_preset(name: str) -> VaeConfig:
    """The config of a named VAE preset, or a ConfigError listing the names."""
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown VAE preset {name!r}: use one of {', '.join(VAE_PRESETS)}") from None


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1-projected when the width changes) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def seq(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(seq(self.q(n)), seq(self.k(n)), seq(self.v(n)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest-neighbour 2x followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    """One resolution level of the decoder: ``num_res_blocks + 1`` resnet blocks, then 2x up."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups) for j in range(num_blocks)])
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Decoder(nn.Module):
    """Latent ``[B, z, h, w]`` -> image ``[B, out_ch, h*8, w*8]`` in about -1..1.

    ``head`` (input convs and the middle block, the only attention) and ``tail`` (the up path and
    the output conv) are separate so that the tail alone can run on tiles.  ``up[i]`` is level i
    (0 = full resolution), run from the last level down, as in the BFL key layout.
    """

    def __init__(self, cfg: VaeConfig):
        super().__init__()
        g, levels = cfg.num_groups, len(cfg.ch_mult)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1) if cfg.post_quant_conv else None
        width = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, g)
        ups: list[UpLevel] = []
        for i in reversed(range(levels)):
            out = cfg.ch * cfg.ch_mult[i]
            ups.append(UpLevel(width, out, cfg.num_res_blocks + 1, g, upsample=i != 0))
            width = out
        self.up = nn.ModuleList(reversed(ups))
        self.norm_out = _norm(width, g)
        self.conv_out = nn.Conv2d(width, cfg.out_ch, 3, padding=1)

    def head(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.mid(self.conv_in(z))

    def tail(self, h: Tensor) -> Tensor:
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: Tensor) -> Tensor:
        return self.tail(self.head(z))


# --------------------------------------------------------------------------------------------
# Tiling helpers
# --------------------------------------------------------------------------------------------


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size`` with at least ``overlap`` shared."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return starts


def _ramp(length: int, start: int, stop: int, size: int, overlap: int, device, dtype) -> Tensor:
    """1-d blend weight of a tile covering [start, stop) of ``size``: linear over the overlap
    on sides that touch another tile, 1 elsewhere (never 0, so every pixel has weight)."""
    w = torch.ones(length, device=device, dtype=dtype)
    if overlap <= 0:
        return w
    ramp = (torch.arange(overlap, device=device, dtype=dtype) + 0.5) / overlap
    if start > 0:
        w[:overlap] = torch.minimum(w[:overlap], ramp)
    if stop < size:
        w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def check_tiling(config: VaeConfig, tile: int | None, overlap: int) -> None:
    """One-line ConfigError for a tile / overlap (pixels) the tiled decode cannot use."""
    if tile is None:
        return
    f = config.downscale
    if tile % f or overlap % f:
        raise ConfigError(f"tile {tile} px and overlap {overlap} px must be multiples of {f}: "
                          f"use tile={tile // f * f or f} overlap={overlap // f * f}")
    if tile < 4 * f or overlap < 0 or 2 * overlap > tile:
        raise ConfigError(f"tile {tile} px with overlap {overlap} px is invalid: use tile >= {4 * f} px and "
                          f"0 <= overlap <= tile/2 (e.g. tile=512 overlap=64)")


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class VaeDecoder(nn.Module):
    """FLUX VAE decoder with the latent pre-processing of its family (see ``VaeConfig``).

    State-dict keys are those of BFL's ``ae.safetensors`` restricted to the decoder:
    ``decoder.*`` and, for FLUX.2, ``bn.running_mean`` / ``bn.running_var`` /
    ``bn.num_batches_tracked``.  ``decode(latent, tile=None, overlap=64, raw=False)`` returns
    ``[B, H, W, C]`` float images in 0..1.  The sharding unit is the whole decoder (one replica
    per GPU), tiles bound its activation memory.
    """

    shard_unit = ("decoder",)

    def __init__(self, config: VaeConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        if config.arch == "flux2":
            self.bn = nn.BatchNorm2d(config.latent_channels, eps=config.bn_eps, affine=False, track_running_stats=True)
            self.bn.eval()

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def to_decoder_space(self, latent: Tensor, raw: bool = False) -> Tensor:
        """Sampler-space latent -> decoder input ``[B, z_channels, h, w]``."""
        cfg = self.config
        cfg.check_latent(latent.shape)
        z = latent.to(self.device, torch.float32)
        p = cfg.patch
        if cfg.arch == "flux1":
            return (z if raw else z / cfg.scale_factor + cfg.shift_factor).to(self.dtype)
        if z.shape[1] == cfg.z_channels:  # un-patchified: patch 2x2 first, channel order (c, pi, pj)
            b, c, h, w = z.shape
            z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)
        if not raw:
            std = torch.sqrt(self.bn.running_var.float() + cfg.bn_eps).view(1, -1, 1, 1)
            z = z * std + self.bn.running_mean.float().view(1, -1, 1, 1)
        b, cpp, h, w = z.shape
        z = z.reshape(b, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, cpp // (p * p), h * p, w * p)
        return z.to(self.dtype)

    def forward(self, z: Tensor) -> Tensor:
        """Decoder-space latent -> image in about -1..1, ``[B, C, H, W]``."""
        return self.decoder(z)

    def decode_tiled(self, z: Tensor, tile: int, overlap: int) -> Tensor:
        """Like ``forward`` but the up path runs on ``tile`` x ``tile`` pixel tiles.

        Neighbouring tiles share ``overlap`` pixels, blended with linear ramps; each tile also
        reads ``overlap`` pixels of context beyond its edges (decoded, then cropped away), so the
        convolutions near a seam see nearly what the full decode sees.
        """
        f = self.config.downscale
        h = self.decoder.head(z)
        b, _, lh, lw = h.shape
        t, o = tile // f, overlap // f
        if t >= lh and t >= lw:
            return self.decoder.tail(h)
        out = torch.zeros(b, self.config.out_ch, lh * f, lw * f, device=h.device, dtype=torch.float32)
        weight = torch.zeros(1, 1, lh * f, lw * f, device=h.device, dtype=torch.float32)
        for y0 in _tile_starts(lh, t, o):
            for x0 in _tile_starts(lw, t, o):
                y1, x1 = min(y0 + t, lh), min(x0 + t, lw)
                ya, yb, xa, xb = max(0, y0 - o), min(lh, y1 + o), max(0, x0 - o), min(lw, x1 + o)
                piece = self.decoder.tail(h[:, :, ya:yb, xa:xb]).float()
                piece = piece[:, :, (y0 - ya) * f:(y1 - ya) * f, (x0 - xa) * f:(x1 - xa) * f]
                wy = _ramp((y1 - y0) * f, y0, y1, lh, o * f, h.device, torch.float32)
                wx = _ramp((x1 - x0) * f, x0, x1, lw, o * f, h.device, torch.float32)
                w = (wy[:, None] * wx[None, :])[None, None]
                out[:, :, y0 * f:y1 * f, x0 * f:x1 * f] += piece * w
                weight[:, :, y0 * f:y1 * f, x0 * f:x1 * f] += w
        return out / weight

    @torch.inference_mode()
    def decode(self, latent: Tensor, tile: int | None = None, overlap: int = 64, raw: bool = False) -> Tensor:
        """Sampler-space latent -> images ``[B, H, W, C]`` float32 in 0..1 (on the model's device)."""
        check_tiling(self.config, tile, overlap)
        z = self.to_decoder_space(latent, raw)
        x = self.decode_tiled(z, tile, overlap) if tile is not None else self.forward(z)
        return ((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1).contiguous()


def build_vae(config: VaeConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> VaeDecoder:
    """A decoder with uninitialised weights; ``device="meta"`` allocates nothing."""
    with torch.device(device):
        model = VaeDecoder(config).to(dtype)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Checkpoints: inspect, slim load, random weights
# --------------------------------------------------------------------------------------------


class VaeInfo(BaseModel):
    """What the header of a VAE checkpoint says (no tensor data read)."""

    path: str
    arch: str
    preset: str | None
    config: VaeConfig
    prefix: str
    dtype: str
    file_bytes: int
    decoder_bytes: int
    has_encoder: bool

    def summary(self) -> dict:
        return {"path": self.path, "arch": self.arch, "preset": self.preset, "prefix": self.prefix,
                "dtype": self.dtype, "file_bytes": self.file_bytes, "decoder_bytes": self.decoder_bytes,
                "has_encoder": self.has_encoder, "config": self.config.model_dump()}


_UP_BLOCK = re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.conv1\.weight$")


def _decoder_key(key: str) -> bool:
    return key.startswith("decoder.") or key.startswith("bn.")


def _infer_vae_config(shapes: dict[str, tuple], meta: dict, path: str) -> VaeConfig:
    if VAE_CONFIG_METADATA_KEY in meta:
        try:
            return VaeConfig.model_validate_json(meta[VAE_CONFIG_METADATA_KEY])
        except Exception as e:
            raise CheckpointError(f"{path}: the embedded VAE config is invalid ({e}): re-export the file") from None
    try:
        z = shapes["decoder.conv_in.weight"][1]
        out_ch, _ = shapes["decoder.conv_out.weight"][:2]
        widths: dict[int, int] = {}
        blocks: dict[int, int] = {}
        for k, s in shapes.items():
            m = _UP_BLOCK.match(k)
            if m:
                i, j = int(m.group(1)), int(m.group(2))
                blocks[i] = max(blocks.get(i, 0), j + 1)
                if j == 0:
                    widths[i] = s[0]
        levels = len(widths)
        outs = [widths[i] for i in range(levels)]
    except (KeyError, IndexError):
        raise CheckpointError(f"{path}: the decoder tensors are incomplete (no conv_in / conv_out / up blocks): "
                              f"the file is truncated or not a FLUX VAE; re-download ae.safetensors") from None
    ch = math.gcd(*outs)
    arch = "flux2" if "bn.running_mean" in shapes else "flux1"
    if arch == "flux1" and z != 16:
        raise CheckpointError(f"{path}: decoder takes {z} latent channels but has no bn.running_mean/var; "
                              f"FLUX.1 VAEs take 16 and FLUX.2 VAEs carry batch-norm stats: pass a FLUX ae.safetensors")
    base = _FLUX1 if arch == "flux1" else _FLUX2
    try:
        return VaeConfig(**{**base, "z_channels": z, "post_quant_conv": "decoder.post_quant_conv.weight" in shapes},
                         ch=ch, ch_mult=[w // ch for w in outs], num_res_blocks=blocks[0] - 1, out_ch=out_ch)
    except ValueError as e:
        raise CheckpointError(f"{path}: decoder shapes do not form a FLUX VAE ({e}): pass a FLUX ae.safetensors") from None


def inspect_vae(path: str | os.PathLike) -> VaeInfo:
    """Read only the safetensors header: family, preset or inferred config, sizes."""
    entries, meta = read_header(path)
    prefix = next((p for p in sorted(PREFIXES, key=len, reverse=True)
                   if f"{p}decoder.conv_in.weight" in entries), None)
    if prefix is None:
        sample = ", ".join(sorted(entries)[:3]) or "nothing"
        raise CheckpointError(f"{path} has no VAE decoder tensors (no 'decoder.*' keys; keys look like {sample}): "
                              f"pass a FLUX VAE file such as ae.safetensors, not a diffusion-model checkpoint")
    own = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
    cfg = _infer_vae_config({k: v[1] for k, v in own.items()}, meta, str(path))
    dec = {k: v for k, v in own.items() if _decoder_key(k)}
    nbytes = sum(tensor_bytes(dt, shape) for dt, shape in dec.values())
    dtypes = sorted({dt for dt, _ in dec.values()})
    name = next((n for n, c in VAE_PRESETS.items() if c == cfg), None)
    return VaeInfo(path=str(path), arch=cfg.arch, preset=name, config=cfg, prefix=prefix,
                   dtype="/".join(d.lower() for d in dtypes), file_bytes=os.path.getsize(path),
                   decoder_bytes=nbytes, has_encoder=any(k.startswith("encoder.") for k in own))


def load_vae_state(path: str | os.PathLike, info: VaeInfo | None = None,
                   device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Slim load: only the decoder (and FLUX.2 batch-norm) tensors are read from the file."""
    info = info or inspect_vae(path)

    def select(full: str) -> str | None:
        key = full[len(info.prefix):] if full.startswith(info.prefix) else None
        return key if key is not None and _decoder_key(key) else None

    return load_tensors(path, select, device=device)


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             info: VaeInfo | None = None) -> VaeDecoder:
    """Build the decoder of a VAE checkpoint and load its weights (decoder keys only)."""
    info = info or inspect_vae(path)
    return vae_from_state(load_vae_state(path, info), info.config, device, dtype, where=str(path))


def vae_from_state(state: dict[str, Tensor], config: VaeConfig, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, where: str = "the VAE weights") -> VaeDecoder:
    """A decoder holding ``state`` (decoder keys, as ``load_vae_state`` returns them)."""
    model = build_vae(config, "meta", dtype)
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} decoder tensors (e.g. {missing[0]}): "
                              f"the file is truncated or from another VAE; re-download it")
    state = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if config.arch == "flux2" and model.bn.num_batches_tracked.is_meta:
        model.bn.num_batches_tracked = torch.zeros((), dtype=torch.long)
    model = model.to(device=device, dtype=dtype)
    for name, b in model.named_buffers():  # batch-norm statistics stay fp32 whatever the dtype
        if name.startswith("bn.running"):
            b.data = state[name].to(device=device, dtype=torch.float32)
    return model.eval()


def save_vae_state(state: dict[str, Tensor], path: str | os.PathLike, config: VaeConfig | None = None,
                   prefix: str = "") -> Path:
    """Write VAE tensors as safetensors atomically; ``config`` is embedded unless it is a released one."""
    released = config is None or any(config == VAE_PRESETS[n] for n in ("flux1", "flux2"))
    meta = None if released else {VAE_CONFIG_METADATA_KEY: config.model_dump_json()}
    return write_atomic({prefix + k: v for k, v in state.items()}, path, meta)


def random_vae_state_dict(config: VaeConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Seeded random weights with the real key layout, scaled so activations stay about unit
    size and the output image has visible structure (norm scales 1, biases small)."""
    model = build_vae(config, "meta")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if ".norm" in name or name.startswith("decoder.norm_out"):
            t = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
        elif name.endswith("bias"):
            t = torch.randn(p.shape, generator=gen) * 0.02
        else:
            fan_in = math.prod(p.shape[1:])
            gain = 0.8 if name.startswith("decoder.conv_out") else 1.0
            t = torch.randn(p.shape, generator=gen) * (gain / math.sqrt(fan_in))
        out[name] = t.to(dtype)
    if config.arch == "flux2":
        n = config.latent_channels
        out["bn.running_mean"] = torch.randn(n, generator=gen) * 0.1
        out["bn.running_var"] = 0.5 + torch.rand(n, generator=gen)
        out["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def write_random_vae(path: str | os.PathLike, preset: VaeConfig | str = "tiny-flux1", seed: int = 0,
                     dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    """A FLUX VAE decoder checkpoint with seeded random weights, written atomically as a real
    safetensors file.  Non-released configs embed themselves in the file's metadata."""
    cfg = vae_preset(preset) if isinstance(preset, str) else preset
    return save_vae_state(random_vae_state_dict(cfg, seed, dtype), path, cfg, prefix)


__all__ = ["TILED_TOLERANCE", "VAE_PRESETS", "VaeConfig", "VaeDecoder", "VaeInfo", "build_vae", "check_tiling", "inspect_vae",
           "load_vae", "load_vae_state", "random_vae_state_dict", "save_vae_state", "vae_from_state", "vae_preset",
           "write_random_vae"]
