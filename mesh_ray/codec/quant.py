"""Per-channel affine uint8 quantisation with round-to-nearest, exact outliers, and predictors.

A group is a [B, C, N] slice of the tensor (channel-major).  Each (b, c) row gets its own
``lo`` and ``step = (hi - lo) / 255``; q = round((x - lo) / step).  With ``clip_percentile`` the
range comes from those percentiles and the values outside it (and any NaN/inf) travel exactly in
a sparse side list.  Error bound of every other value: |x - x_hat| <= step / 2 (before the cast
to the output dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

LEVELS = 255


@dataclass
class Quantized:
    """One group after quantisation: per-row range, codes, and the exact side list."""

    lo: torch.Tensor  # [B, C] float32
    step: torch.Tensor  # [B, C] float32
    q: torch.Tensor  # [B, C, N] uint8
    clip_idx: torch.Tensor  # [K] int64 flat indices into [B, C, N]
    clip_val: torch.Tensor  # [K] in the tensor's dtype


def channel_range(x: torch.Tensor, clip_percentile: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lo, hi) of [R, N] float32: min/max, or the percentiles when clipping."""
    n = x.shape[-1]
    if clip_percentile is None or n < 2:
        return x.amin(-1), x.amax(-1)
    k = max(1, math.ceil(n * (100.0 - clip_percentile) / 100.0))
    if k == 1:
        return x.amin(-1), x.amax(-1)
    return x.kthvalue(k, -1).values, x.kthvalue(n - k + 1, -1).values


def quantize(x: torch.Tensor, clip_percentile: float | None = None) -> Quantized:
    """[B, C, N] tensor (any float dtype) -> Quantized (round to nearest, outliers exact)."""
    b, c, n = x.shape
    if n == 0:
        zeros = torch.zeros(b, c, dtype=torch.float32, device=x.device)
        return Quantized(zeros, zeros, torch.zeros(b, c, 0, dtype=torch.uint8, device=x.device),
                         torch.zeros(0, dtype=torch.int64, device=x.device), x.reshape(-1)[:0])
    xs = xf = x.float()
    lo, hi = channel_range(xf.reshape(b * c, n), clip_percentile)
    if clip_percentile is None:  # min and max show any NaN/inf: no pass over the whole tensor for it
        all_finite = bool((torch.isfinite(lo) & torch.isfinite(hi)).all())
    else:
        all_finite = bool(torch.isfinite(xf).all())
    if not all_finite:  # the ranges of the finite values; the rest go to the side list
        finite = torch.isfinite(xf)
        xs = torch.where(finite, xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
        lo, hi = channel_range(xs.reshape(b * c, n), clip_percentile)
    lo, hi = lo.reshape(b, c, 1), hi.reshape(b, c, 1)
    step = ((hi.double() - lo.double()) / LEVELS).float()
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    q = torch.round((xs - lo) * inv).clamp_(0, LEVELS).to(torch.uint8)
    outside = None
    if clip_percentile is not None:
        outside = (xs < lo) | (xs > hi)
    if not all_finite:
        outside = ~finite if outside is None else outside | ~finite
    if outside is None:
        idx = torch.zeros(0, dtype=torch.int64, device=x.device)
    else:
        idx = outside.reshape(-1).nonzero().squeeze(1)
    return Quantized(lo.reshape(b, c), step.reshape(b, c), q, idx, x.reshape(-1)[idx])


def dequantize(qz: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """Quantized -> [B, C, N] tensor of ``dtype`` (side-list values restored bit for bit)."""
    out = (qz.lo.unsqueeze(-1) + qz.q.float() * qz.step.unsqueeze(-1)).to(dtype)
    if qz.clip_idx.numel():
        out.view(-1)[qz.clip_idx] = qz.clip_val.to(dtype)
    return out


def truncate_minmax(x: torch.Tensor) -> torch.Tensor:
    """Baseline (comfyui-mesh): per-channel min/max, codes truncated toward zero; returns the decode."""
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    q = ((xf - lo) / span * LEVELS).to(torch.uint8)  # float->uint8 truncates
    return (q.float() / LEVELS * span + lo).to(x.dtype)


# ---- predictors on the uint8 codes: residuals wrap mod 256, so the inverse is a cumulative sum ----
# torch ops on the codes' own device; the CPU results are the ones the numpy version wrote (golden
# payloads in tests/data/codec_golden.safetensors).

def predict(q: torch.Tensor, kind: str) -> torch.Tensor:
    """Codes [..., H, W] uint8 -> residuals (``delta1d`` along the row-major order, ``delta2d`` both axes)."""
    if kind == "none" or q.numel() == 0:
        return q
    if kind == "delta1d":
        flat = q.reshape(*q.shape[:-2], -1)
        r = flat.clone()
        r[..., 1:] -= flat[..., :-1]
        return r.reshape(q.shape)
    r = q.clone()
    r[..., 1:] -= q[..., :-1]
    r[..., 1:, :] -= r[..., :-1, :].clone()
    return r


def unpredict(r: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of ``predict`` (cumulative sums that wrap mod 256)."""
    if kind == "none" or r.numel() == 0:
        return r
    if kind == "delta1d":
        return _cumsum_mod256(r.reshape(*r.shape[:-2], -1), -1).reshape(r.shape)
    return _cumsum_mod256(_cumsum_mod256(r, -2), -1)


def _cumsum_mod256(x: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 cumulative sum that wraps like uint8 arithmetic (summed in int32, or int64 for > 8M terms)."""
    wide = torch.int32 if x.shape[dim] < (1 << 31) // 255 else torch.int64
    return torch.cumsum(x, dim, dtype=wide).bitwise_and_(255).to(torch.uint8)


def choose_predictor(q: torch.Tensor, candidates: tuple[str, ...]) -> str:
    """The candidate whose residuals have the lowest byte entropy on a sample of rows.

    Histograms are counted on the codes' device; only the [candidates, 256] counts come to the
    host, where the entropy is computed in float64 (one small copy, the same choice on every device).
    """
    rows = q.reshape(-1, *q.shape[-2:])
    sample = rows[:: max(1, rows.shape[0] // 32)][:32]
    hist = torch.zeros(len(candidates), 256, dtype=torch.int64, device=q.device)
    for i, kind in enumerate(candidates):
        values = predict(sample, kind).reshape(-1).long()
        hist[i].scatter_add_(0, values, torch.ones_like(values))
    counts = hist.cpu().numpy().astype(np.float64)
    best, best_bits = "none", float("inf")
    for kind, h in zip(candidates, counts):
        p = h[h > 0] / h.sum()
        bits = float(-(p * np.log2(p)).sum())
        if bits < best_bits - 0.02:  # prefer the simpler predictor unless it clearly loses
            best, best_bits = kind, bits
    return best
