"""FLUX.1 and FLUX.2 diffusion transformers with the BFL / ComfyUI checkpoint key layout.

Reads top to bottom: math helpers, embedders, the two block kinds, the final layer, then the
model.  The model's forward is cut into three public pieces so that a block range can run
elsewhere (a Ray stage actor) and the pieces still compose to exactly the same result:

    state, cond = model.embed(...)                  # inputs -> streams, per-step conditioning
    state = model.run_blocks(state, cond, start, stop)   # any global block range
    out = model.finish(state, cond)                 # final layer

Global block index b runs over ``double_blocks`` first (b < depth) and then ``single_blocks``;
the text and image streams are joined (text first) when the first single block runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn

from mesh_ray.errors import ConfigError
from mesh_ray.models.blocks import KINDS, locate

# --------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------


class FluxConfig(BaseModel):
    """Hyperparameters of a FLUX-family transformer.

    Fields (type, default):
      arch (``"flux1" | "flux2"``, required): FLUX.1 (per-block modulation, GELU MLP, biases,
          3-axis RoPE) or FLUX.2 (shared modulation, SiLU-gated MLP, no biases, 4-axis RoPE).
      in_channels (int, required): channels of one image token (latent channels x 2 x 2).
      context_in_dim (int, required): width of the text-encoder embeddings.
      vec_in_dim (int | None, None): width of the pooled text vector (FLUX.1 only).
      hidden_size (int, required), num_heads (int, required), mlp_ratio (float, 4.0).
      depth (int, required): double-stream blocks; depth_single_blocks (int, required).
      axes_dim (list[int], required): RoPE dims per position axis; sums to the head dim.
      theta (int, 10000): RoPE base.
      qkv_bias (bool, True): bias on the attention qkv projections (FLUX.1).
      guidance_embed (bool, False): distilled guidance input (FLUX.1 dev, FLUX.2 dev).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["flux1", "flux2"]
    in_channels: int
    context_in_dim: int
    vec_in_dim: int | None = None
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = False

    @model_validator(mode="after")
    def _check(self) -> "FluxConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every axes_dim entry must be even, got {self.axes_dim}")
        if self.arch == "flux1" and self.vec_in_dim is None:
            raise ValueError("flux1 needs vec_in_dim (the pooled text width)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_blocks(self) -> int:
        return self.depth + self.depth_single_blocks

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent (tokens are 2x2 patches of it)."""
        return self.in_channels // 4


def default_axes_dim(arch: str, head_dim: int) -> list[int]:
    """RoPE split used by the released models: FLUX.1 [16, 56, 56], FLUX.2 [32, 32, 32, 32] at 128."""
    if arch == "flux1":
        return [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16]
    return [head_dim // 4] * 4


_FLUX1 = dict(arch="flux1", in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
              num_heads=24, mlp_ratio=4.0, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
              theta=10000, qkv_bias=True)
_FLUX2 = dict(arch="flux2", in_channels=128, mlp_ratio=3.0, axes_dim=[32, 32, 32, 32], theta=2000,
              qkv_bias=False)

PRESETS: dict[str, FluxConfig] = {
    "flux1-dev": FluxConfig(**_FLUX1, guidance_embed=True),
    "flux1-schnell": FluxConfig(**_FLUX1, guidance_embed=False),
    "flux2-klein-4b": FluxConfig(**_FLUX2, context_in_dim=7680, hidden_size=3072, num_heads=24,
                                 depth=5, depth_single_blocks=20, guidance_embed=False),
    "flux2-klein-9b": FluxConfig(**_FLUX2, context_in_dim=12288, hidden_size=4096, num_heads=32,
                                 depth=8, depth_single_blocks=24, guidance_embed=False),
    "flux2-dev": FluxConfig(**_FLUX2, context_in_dim=15360, hidden_size=6144, num_heads=48,
                            depth=8, depth_single_blocks=48, guidance_embed=True),
    # Small configs with the same architecture, for tests and the demo.
    "tiny-flux1": FluxConfig(arch="flux1", in_channels=64, vec_in_dim=32, context_in_dim=48,
                             hidden_size=128, num_heads=4, mlp_ratio=4.0, depth=2,
                             depth_single_blocks=4, axes_dim=[4, 14, 14], theta=10000,
                             qkv_bias=True, guidance_embed=True),
    "tiny-flux2": FluxConfig(arch="flux2", in_channels=128, context_in_dim=96, hidden_size=128,
                             num_heads=4, mlp_ratio=3.0, depth=2, depth_single_blocks=4,
                             axes_dim=[8, 8, 8, 8], theta=2000, qkv_bias=False,
                             guidance_embed=False),
}


def preset(name: str) -> FluxConfig:
    """The config of a named preset, or a ConfigError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------------------------
# Math: rotary position embedding, attention, timestep embedding
# --------------------------------------------------------------------------------------------


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices [..., n, dim/2, 2, 2] for positions ``pos`` [..., n] on one axis."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = pos.to(torch.float64).unsqueeze(-1) * omega
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def embed_positions(ids: Tensor, axes_dim: list[int], theta: int) -> Tensor:
    """RoPE for token ids [B, L, n_axes] -> [B, 1, L, head_dim/2, 2, 2]."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = pe[..., 0] * xq_[..., 0] + pe[..., 1] * xq_[..., 1]
    xk_out = pe[..., 0] * xk_[..., 0] + pe[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Rotary attention over [B, H, L, D] -> [B, L, H*D]."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps t [N] -> [N, dim]."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t)
    return emb


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class Mod(NamedTuple):
    """One adaLN modulation: ``(1 + scale) * norm(x) + shift`` in, ``x + gate * f(...)`` out."""

    shift: Tensor
    scale: Tensor
    gate: Tensor


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * x + shift


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Parameter holder (qkv, norm, proj); the math runs in the blocks on joint sequences."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=bias)


class SiLUGate(nn.Module):
    """FLUX.2's gated MLP activation: silu(a) * b for the two halves of the input."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class Modulation(nn.Module):
    """``Mod`` records (shift, scale, gate) from the conditioning vector: two when ``double``
    (attention, then MLP), else one."""

    def __init__(self, dim: int, double: bool, bias: bool = True):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec: Tensor) -> tuple[Mod, ...]:
        out = self.lin(F.silu(vec))
        if out.ndim == 2:
            out = out[:, None, :]
        chunks = out.chunk(self.multiplier, dim=-1)
        return tuple(Mod(*chunks[i : i + 3]) for i in range(0, self.multiplier, 3))


def _mlp(hidden: int, mlp_hidden: int, gated: bool, bias: bool) -> nn.Sequential:
    if gated:
        return nn.Sequential(nn.Linear(hidden, 2 * mlp_hidden, bias=bias), SiLUGate(),
                             nn.Linear(mlp_hidden, hidden, bias=bias))
    return nn.Sequential(nn.Linear(hidden, mlp_hidden, bias=bias), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden, hidden, bias=bias))


@dataclass
class BlockCond:
    """Per-step conditioning every block reads: ``vec``, and FLUX.2's shared modulations."""

    vec: Tensor
    double_img: tuple[Mod, Mod] | None = None  # FLUX.2: (attention, MLP) modulation of the image stream
    double_txt: tuple[Mod, Mod] | None = None
    single: Mod | None = None


@dataclass
class BlockState:
    """The streams between blocks: separate ``img``/``txt``, or joined (``txt`` None, text first)."""

    img: Tensor
    txt: Tensor | None
    txt_len: int

    @property
    def joined(self) -> bool:
        return self.txt is None

    def join(self) -> "BlockState":
        if self.joined:
            return self
        return BlockState(torch.cat((self.txt, self.img), dim=1), None, self.txt_len)

    def unjoin(self) -> "BlockState":
        if not self.joined:
            return self
        return BlockState(self.img[:, self.txt_len :], self.img[:, : self.txt_len], self.txt_len)

    def tensors(self) -> list[Tensor]:
        return [self.img] if self.txt is None else [self.img, self.txt]


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text first)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h, flux1 = cfg.hidden_size, cfg.arch == "flux1"
        self.num_heads = cfg.num_heads
        if flux1:  # FLUX.2 computes the modulation once for all blocks (BlockCond)
            self.img_mod = Modulation(h, double=True)
            self.txt_mod = Modulation(h, double=True)
        for s in ("img", "txt"):
            setattr(self, f"{s}_norm1", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", SelfAttention(h, cfg.num_heads, cfg.qkv_bias, bias=flux1))
            setattr(self, f"{s}_norm2", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", _mlp(h, cfg.mlp_hidden, gated=not flux1, bias=flux1))

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, cond: BlockCond) -> tuple[Tensor, Tensor]:
        if hasattr(self, "img_mod"):
            (img_m1, img_m2), (txt_m1, txt_m2) = self.img_mod(cond.vec), self.txt_mod(cond.vec)
        else:
            (img_m1, img_m2), (txt_m1, txt_m2) = cond.double_img, cond.double_txt

        img_q, img_k, img_v = _split_heads(
            self.img_attn.qkv(_modulate(self.img_norm1(img), img_m1.shift, img_m1.scale)), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = _split_heads(
            self.txt_attn.qkv(_modulate(self.txt_norm1(txt), txt_m1.shift, txt_m1.scale)), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_m1.gate * self.img_attn.proj(img_attn)
        img = img + img_m2.gate * self.img_mlp(_modulate(self.img_norm2(img), img_m2.shift, img_m2.scale))
        txt = txt + txt_m1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_m2.gate * self.txt_mlp(_modulate(self.txt_norm2(txt), txt_m2.shift, txt_m2.scale))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream (text + image joined) with fused qkv+MLP input and attn+MLP output layers."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        h, flux1 = cfg.hidden_size, cfg.arch == "flux1"
        self.num_heads = cfg.num_heads
        self.hidden_size = h
        self.mlp_in = cfg.mlp_hidden * (1 if flux1 else 2)
        self.linear1 = nn.Linear(h, 3 * h + self.mlp_in, bias=flux1)
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h, bias=flux1)
        self.norm = QKNorm(cfg.head_dim)
        self.pre_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh") if flux1 else SiLUGate()
        if flux1:
            self.modulation = Modulation(h, double=False)

    def forward(self, x: Tensor, pe: Tensor, cond: BlockCond) -> Tensor:
        m = self.modulation(cond.vec)[0] if hasattr(self, "modulation") else cond.single
        qkv, mlp = torch.split(self.linear1(_modulate(self.pre_norm(x), m.shift, m.scale)),
                               [3 * self.hidden_size, self.mlp_in], dim=-1)
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), dim=2))
        return x + m.gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, bias: bool):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift[:, None, :], scale[:, None, :]))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

BlockReplace = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


class Flux(nn.Module):
    """FLUX.1 / FLUX.2 transformer over packed image tokens (see ``FluxConfig`` for the fields).

    ``forward(img, img_ids, txt, txt_ids, timesteps, y=None, guidance=None,
    transformer_options=None)`` takes image tokens [B, L_img, in_channels], text embeddings
    [B, L_txt, context_in_dim], position ids [B, L, n_axes], timesteps [B] in 0..1, the pooled
    vector y [B, vec_in_dim] (FLUX.1) and guidance [B] (guidance-distilled models) and returns
    the predicted velocity [B, L_img, in_channels].

    The sharding unit is one transformer block (``shard_unit``): a global index over
    ``double_blocks`` then ``single_blocks``.  ``transformer_options["patches_replace"]["dit"]``
    may map ``("double_block", i)`` / ``("single_block", i)`` to a function
    ``f(args, {"original_block": fn}) -> dict`` that runs instead of that block, as in ComfyUI.
    """

    shard_unit = tuple(f"{kind}_blocks" for kind in KINDS)

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = cfg = config
        flux1 = cfg.arch == "flux1"
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h, bias=flux1)
        self.time_in = MLPEmbedder(256, h, bias=flux1)
        if flux1:
            self.vector_in = MLPEmbedder(cfg.vec_in_dim, h)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(256, h, bias=flux1)
        self.txt_in = nn.Linear(cfg.context_in_dim, h, bias=flux1)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(cfg) for _ in range(cfg.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks)])
        if not flux1:
            self.double_stream_modulation_img = Modulation(h, double=True, bias=False)
            self.double_stream_modulation_txt = Modulation(h, double=True, bias=False)
            self.single_stream_modulation = Modulation(h, double=False, bias=False)
        self.final_layer = LastLayer(h, cfg.in_channels, bias=flux1)

    @property
    def num_blocks(self) -> int:
        return self.config.num_blocks

    def block(self, index: int) -> nn.Module:
        """The block at global index ``index`` (double blocks first)."""
        kind, i = locate(index, self.config.depth)
        return getattr(self, f"{kind}_blocks")[i]

    # -- validation -------------------------------------------------------------------------

    def check_inputs(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
                     timesteps: Tensor, y: Tensor | None, guidance: Tensor | None) -> None:
        """Raise a one-line ConfigError when an input has the wrong shape for this model."""
        cfg = self.config
        n_axes = len(cfg.axes_dim)

        def bad(what: str, got: Any, want: str) -> ConfigError:
            return ConfigError(f"{what} has shape {tuple(got)} but this {cfg.arch} model expects {want}: "
                               f"check the latent size and the conditioning for this checkpoint")

        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise bad("img (latent tokens)", img.shape, f"[B, L, {cfg.in_channels}]")
        b = img.shape[0]
        if txt.ndim != 3 or txt.shape[0] != b or txt.shape[-1] != cfg.context_in_dim:
            raise bad("txt (text embeddings)", txt.shape, f"[{b}, L_txt, {cfg.context_in_dim}]")
        if tuple(img_ids.shape) != (b, img.shape[1], n_axes):
            raise bad("img_ids", img_ids.shape, f"[{b}, {img.shape[1]}, {n_axes}]")
        if tuple(txt_ids.shape) != (b, txt.shape[1], n_axes):
            raise bad("txt_ids", txt_ids.shape, f"[{b}, {txt.shape[1]}, {n_axes}]")
        if tuple(timesteps.shape) != (b,):
            raise bad("timesteps", timesteps.shape, f"[{b}]")
        if cfg.arch == "flux1":
            if y is None or tuple(y.shape) != (b, cfg.vec_in_dim):
                raise bad("y (pooled text vector)", () if y is None else y.shape, f"[{b}, {cfg.vec_in_dim}]")
        if cfg.guidance_embed and (guidance is None or tuple(guidance.shape) != (b,)):
            raise bad("guidance", () if guidance is None else guidance.shape, f"[{b}] (this model is guidance-distilled)")

    # -- the three pieces of the forward ------------------------------------------------------

    def embed_positions(self, img_ids: Tensor, txt_ids: Tensor) -> Tensor:
        """RoPE for the joint sequence (text first); constant for a whole generation."""
        return embed_positions(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.theta)

    def embed_text(self, txt: Tensor) -> Tensor:
        return self.txt_in(txt)

    def conditioning(self, timesteps: Tensor, y: Tensor | None = None, guidance: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> BlockCond:
        """Per-step conditioning: ``vec`` and (FLUX.2) the shared modulations."""
        dtype = dtype or self.time_in.in_layer.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.config.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        if self.config.arch == "flux1":
            return BlockCond(vec=vec + self.vector_in(y.to(dtype)))
        return BlockCond(vec=vec,
                         double_img=self.double_stream_modulation_img(vec),
                         double_txt=self.double_stream_modulation_txt(vec),
                         single=self.single_stream_modulation(vec)[0])

    def embed(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
              y: Tensor | None = None, guidance: Tensor | None = None) -> tuple[BlockState, BlockCond, Tensor]:
        """Inputs -> (streams, per-step conditioning, rotary embedding)."""
        self.check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        cond = self.conditioning(timesteps, y, guidance, dtype=img.dtype)
        state = BlockState(self.img_in(img), self.embed_text(txt), txt.shape[1])
        return state, cond, self.embed_positions(img_ids, txt_ids)

    def run_blocks(self, state: BlockState, cond: BlockCond, pe: Tensor, start: int, stop: int,
                   transformer_options: dict | None = None) -> BlockState:
        """Run global blocks ``start <= b < stop``; joins the streams at the first single block."""
        replace: dict = ((transformer_options or {}).get("patches_replace") or {}).get("dit") or {}
        depth = self.config.depth
        for b in range(start, stop):
            kind, i = locate(b, depth)
            key = (f"{kind}_block", i)
            if kind == "double":
                state = state.unjoin()
                if key in replace:
                    out = replace[key](
                        {"img": state.img, "txt": state.txt, "vec": cond.vec, "pe": pe, "cond": cond,
                         "transformer_options": transformer_options},
                        {"original_block": self._wrap_double(b)})
                    state = BlockState(out["img"], out["txt"], state.txt_len)
                else:
                    img, txt = self.double_blocks[b](state.img, state.txt, pe, cond)
                    state = BlockState(img, txt, state.txt_len)
            else:
                state = state.join()
                if key in replace:
                    out = replace[key]({"img": state.img, "vec": cond.vec, "pe": pe, "cond": cond,
                                        "transformer_options": transformer_options},
                                       {"original_block": self._wrap_single(i)})
                    state = BlockState(out["img"], None, state.txt_len)
                else:
                    state = BlockState(self.single_blocks[i](state.img, pe, cond), None, state.txt_len)
        return state

    def finish(self, state: BlockState, cond: BlockCond) -> Tensor:
        """Streams after the last block -> predicted velocity for the image tokens."""
        x = state.join().img[:, state.txt_len :]
        return self.final_layer(x, cond.vec)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor | None = None, guidance: Tensor | None = None,
                transformer_options: dict | None = None) -> Tensor:
        state, cond, pe = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        state = self.run_blocks(state, cond, pe, 0, self.num_blocks, transformer_options)
        return self.finish(state, cond)

    def _wrap_double(self, b: int) -> Callable[[dict], dict]:
        def run(args: dict) -> dict:
            img, txt = self.double_blocks[b](args["img"], args["txt"], args["pe"], args["cond"])
            return {"img": img, "txt": txt}
        return run

    def _wrap_single(self, i: int) -> Callable[[dict], dict]:
        def run(args: dict) -> dict:
            return {"img": self.single_blocks[i](args["img"], args["pe"], args["cond"])}
        return run


# --------------------------------------------------------------------------------------------
# Token packing and position ids (latent <-> tokens)
# --------------------------------------------------------------------------------------------


def pack_latent(latent: Tensor) -> Tensor:
    """[B, C, H, W] latent -> [B, (H/2)(W/2), 4C] tokens of 2x2 patches."""
    b, c, h, w = latent.shape
    if h % 2 or w % 2:
        raise ConfigError(f"latent height and width must be even, got {h}x{w}: use an image size divisible by 16")
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_tokens(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``pack_latent``: tokens -> [B, C, height, width] latent (latent pixels)."""
    b, n, c4 = tokens.shape
    h2, w2 = height // 2, width // 2
    if n != h2 * w2:
        raise ConfigError(f"{n} tokens do not form a {height}x{width} latent: pass the latent size the tokens came from")
    x = tokens.reshape(b, h2, w2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def position_ids(arch: str, batch: int, h_tokens: int, w_tokens: int, txt_len: int,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(img_ids, txt_ids) for a h_tokens x w_tokens token grid and ``txt_len`` text tokens.

    FLUX.1 uses (index, row, col) with zero text ids; FLUX.2 uses (t, row, col, l) with the text
    position on the last axis.
    """
    rows = torch.arange(h_tokens, device=device, dtype=torch.float32)[:, None].expand(h_tokens, w_tokens)
    cols = torch.arange(w_tokens, device=device, dtype=torch.float32)[None, :].expand(h_tokens, w_tokens)
    zeros = torch.zeros_like(rows)
    if arch == "flux1":
        img = torch.stack([zeros, rows, cols], dim=-1).reshape(1, -1, 3)
        txt = torch.zeros(1, txt_len, 3, device=device)
    else:
        img = torch.stack([zeros, rows, cols, zeros], dim=-1).reshape(1, -1, 4)
        txt = torch.zeros(1, txt_len, 4, device=device)
        txt[..., 3] = torch.arange(txt_len, device=device, dtype=torch.float32)
    return img.expand(batch, -1, -1).contiguous(), txt.expand(batch, -1, -1).contiguous()


def build(config: FluxConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Flux:
    """A model with uninitialised weights; ``device="meta"`` allocates nothing (for slim loading)."""
    with torch.device(device):
        return Flux(config).to(dtype)


def random_state_dict(config: FluxConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                      std: float = 0.02, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Seeded random weights with the real key layout (norm scales 1, others N(0, std)).

    ``device`` is where the numbers are drawn and kept: a GPU draws a FLUX.1-dev-size model in a
    second where the CPU needs minutes (the same seed gives other numbers on another device type).
    """
    model = build(config, "meta")
    gen = torch.Generator(device).manual_seed(seed)
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if name.endswith(".scale"):
            out[name] = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            out[name] = (torch.randn(p.shape, generator=gen, device=device) * std).to(dtype)
    return out
