"""Codec benchmark: every mode/QP on a standard activation set, with the comfyui-mesh baseline.

Sets:
  (a) ``tiny-flux``: the joined stream of the tiny FLUX.1 model (seeded random weights) after
      its double blocks and one single block, fed a spatially smooth latent.
  (b) ``synthetic``: see ``synthetic_activation``.
Each row: mode, qp, ratio (bf16 bytes / wire bytes), cosine, rel_l2, max_abs, encode_ms,
decode_ms and breakeven_mb_s, the link speed below which sending the coded payload (plus coding
time) is faster than sending raw bf16: (raw - wire) / (encode + decode time).
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from mesh_ray.tables import text_table
from mesh_ray.codec import decode, encode, error_stats
from mesh_ray.codec.quant import truncate_minmax


def smooth_field(channels: int, h: int, w: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """[channels, h, w] unit-variance Gaussian noise blurred with a Gaussian of ``sigma`` tokens."""
    noise = torch.randn(channels, 1, h, w, generator=gen)
    r = max(1, int(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(noise, (r, r, 0, 0), mode="circular"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="circular"), k.view(1, 1, -1, 1))
    x = x.squeeze(1)
    return x / x.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1)


def synthetic_activation(tokens_hw: tuple[int, int] = (64, 64), txt_len: int = 512, channels: int = 3072,
                         seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Set (b): [1, txt_len + h*w, channels], seeded.

    Image tokens: per channel 0.9 * smooth (Gaussian blur, sigma 2 tokens) + 0.44 * white noise
    (81 % of the variance spatially correlated), times a log-normal channel scale exp(N(0, 1)),
    plus a per-channel mean N(0, 0.5) * scale.  Four "massive" channels carry a near-constant
    value 100x-300x the median scale (5 % token-to-token variation), as in DiT massive activations.
    Text tokens: the same channel scales and means, no spatial structure.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = tokens_hw
    rho = 0.9
    img = rho * smooth_field(channels, h, w, 2.0, gen) + (1 - rho**2) ** 0.5 * torch.randn(channels, h, w, generator=gen)
    scale = torch.exp(torch.randn(channels, generator=gen))
    mean = 0.5 * torch.randn(channels, generator=gen) * scale
    img = img * scale.view(-1, 1, 1) + mean.view(-1, 1, 1)
    txt = torch.randn(channels, txt_len, generator=gen) * scale.view(-1, 1) + mean.view(-1, 1)
    massive = torch.randperm(channels, generator=gen)[: min(4, channels)]
    for i, c in enumerate(massive.tolist()):
        big = (100 + 200 * torch.rand(1, generator=gen).item()) * (-1) ** i
        img[c] = big * (1 + 0.05 * img[c] / scale[c])
        txt[c] = big * (1 + 0.05 * torch.randn(txt_len, generator=gen))
    x = torch.cat((txt, img.reshape(channels, h * w)), dim=1).T.unsqueeze(0)
    return x.to(dtype).contiguous()


def tiny_flux_activation(tokens_hw: tuple[int, int] = (64, 64), txt_len: int = 512, seed: int = 0,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Set (a): the joined [1, txt_len + h*w, 128] stream of tiny-flux1 after 3 blocks."""
    from mesh_ray.models.flux import PRESETS, build, pack_latent, position_ids, random_state_dict

    cfg = PRESETS["tiny-flux1"]
    model = build(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    h, w = tokens_hw
    latent = smooth_field(cfg.latent_channels, 2 * h, 2 * w, 3.0, gen).unsqueeze(0)
    img_ids, txt_ids = position_ids(cfg.arch, 1, h, w, txt_len)
    txt = torch.randn(1, txt_len, cfg.context_in_dim, generator=gen)
    with torch.no_grad():
        state, cond, pe = model.embed(pack_latent(latent), img_ids, txt, txt_ids, torch.tensor([0.5]),
                                      y=torch.randn(1, cfg.vec_in_dim, generator=gen), guidance=torch.tensor([3.5]))
        state = model.run_blocks(state, cond, pe, 0, cfg.depth + 1).join()
    return state.img.to(dtype).contiguous()


def _row(set_name: str, mode: str, qp: int | None, x: torch.Tensor, got: torch.Tensor, wire: int,
         enc_ms: float, dec_ms: float, **extra) -> dict:
    raw = x.numel() * 2  # bf16 bytes
    stats = error_stats(x, got)
    secs = (enc_ms + dec_ms) / 1e3
    breakeven = (raw - wire) / 1e6 / secs if wire < raw and secs > 0 else (float("inf") if wire < raw else 0.0)
    return {"set": set_name, "mode": mode, "qp": qp, "ratio": raw / wire, "cosine": stats["cosine"],
            "rel_l2": stats["rel_l2"], "max_abs": stats["max_abs"], "encode_ms": enc_ms, "decode_ms": dec_ms,
            "breakeven_mb_s": breakeven, "wire_bytes": wire, **extra}


def _codec_row(set_name: str, x: torch.Tensor, spec: dict, grid, txt_len: int) -> dict:
    t0 = time.perf_counter()
    data = encode(x, spec, grid, txt_len)
    t1 = time.perf_counter()
    got = decode(data)
    t2 = time.perf_counter()
    extra = {k: v for k, v in spec.items() if k not in ("mode", "qp")}
    qp = spec.get("qp") if spec["mode"] == "hevc" else None
    return _row(set_name, spec["mode"], qp, x, got, len(data), (t1 - t0) * 1e3, (t2 - t1) * 1e3, **extra)


def _baseline_row(set_name: str, x: torch.Tensor) -> dict:
    """comfyui-mesh: per-channel min/max, truncating to uint8, 1 byte a value + fp32 min/max per channel."""
    t0 = time.perf_counter()
    got = truncate_minmax(x[0].T).T.unsqueeze(0)
    ms = (time.perf_counter() - t0) * 1e3
    wire = x.numel() + 8 * x.shape[-1]
    return _row(set_name, "baseline-minmax-trunc", None, x, got, wire, ms / 2, ms / 2, entropy="none")


def run_codec_bench(quick: bool = False, tokens_hw: tuple[int, int] = (64, 64), txt_len: int = 512,
                    channels: int = 3072, seed: int = 0) -> dict:
    """All rows on sets (a) and (b); ``quick`` shrinks the tensors and the QP ladder (for tests)."""
    if quick:
        tokens_hw, txt_len, channels = (16, 16), 32, 192
    qps = (18, 30) if quick else (6, 12, 18, 24, 30, 36)
    sets = {"tiny-flux": tiny_flux_activation(tokens_hw, txt_len, seed),
            "synthetic": synthetic_activation(tokens_hw, txt_len, channels, seed)}
    specs = [{"mode": "raw"}, {"mode": "quant8", "lossless": True}, {"mode": "quant8", "entropy": "none"},
             {"mode": "quant8"}, {"mode": "quant8", "clip_percentile": 99.99}]
    specs += [{"mode": "hevc", "qp": qp, "backend": "x265"} for qp in qps]
    rows = []
    for name, x in sets.items():
        rows.append(_baseline_row(name, x))
        rows += [_codec_row(name, x, spec, tokens_hw, txt_len) for spec in specs]
    return {"rows": rows, "shape": {k: list(v.shape) for k, v in sets.items()}, "grid": list(tokens_hw),
            "txt_len": txt_len}


def format_table(result: dict) -> str:
    """The rows as a table for people."""
    cols = ["set", "mode", "qp", "ratio", "cosine", "rel_l2", "max_abs", "encode_ms", "decode_ms", "breakeven_mb_s"]
    rows = []
    for r in result["rows"]:
        mode = r["mode"] + ("+clip" if r.get("clip_percentile") else "") + ("/lossless" if r.get("lossless") else "") \
            + ("/noentropy" if r.get("entropy") == "none" and r["mode"] == "quant8" else "")
        cells = [r["set"], mode, "" if r["qp"] is None else r["qp"], f"{r['ratio']:.2f}", f"{r['cosine']:.6f}",
                 f"{r['rel_l2']:.2e}", f"{r['max_abs']:.3g}", f"{r['encode_ms']:.1f}", f"{r['decode_ms']:.1f}",
                 f"{r['breakeven_mb_s']:.0f}"]
        rows.append(cells)
    return text_table(cols, rows)


if __name__ == "__main__":  # python -m mesh_ray.bench.codec [--quick] [--json]
    import sys

    res = run_codec_bench(quick="--quick" in sys.argv)
    print(format_table(res))
    if "--json" in sys.argv:
        print(json.dumps({"rows": res["rows"]}))
