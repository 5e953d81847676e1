"""``mesh-ray bench offload``: a fully resident model against weight streaming, side by side in one run.

Rows: the model fully resident, ``AutoOffload`` at each window, ``AutoOffload`` under a
``max_device_bytes`` budget of ``budget_fraction`` of the block weights (plus the trunk), and on a
GPU diffusers' group offloading (``use_stream=True``) on the same blocks as the peer.  Each row:
window, step_ms, ratio_vs_resident, peak_device_bytes, resident_fraction, max_abs_diff, and the
bytes streamed per step with the bound they imply at the measured host-to-device bandwidth.

Goal on a GPU: step_ms <= 1.10 x max(resident step, streamed bytes / bandwidth) with at most 25%
of the block weights resident, and faster than the diffusers row at equal or lower peak memory.
On a CPU the "device" is the CPU itself: the rows check the bookkeeping, not the speed.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from mesh_ray.actors.device import resolve_dtype
from mesh_ray.tables import text_table
from mesh_ray.errors import ConfigError
from mesh_ray.memory.offload import AutoOffload, resolve_device
from mesh_ray.models.flux import Flux, FluxConfig, build, default_axes_dim, position_ids, random_state_dict

# (hidden, image tokens, blocks, timed steps) when not given: a 2-core CPU finishes "full" in about a
# minute and "quick" in seconds; on a GPU "full" is FLUX.1-dev at 1024x1024.
_SIZES = {("cpu", False): (384, 1024, 12, 5), ("cpu", True): (128, 64, 9, 2),
          ("cuda", False): (3072, 4096, 57, 5), ("cuda", True): (1024, 1024, 12, 3)}
GOAL_RATIO, GOAL_RESIDENT = 1.10, 0.25


def bench_config(hidden: int, blocks: int) -> FluxConfig:
    """A FLUX.1-architecture config of ``hidden`` width with ``blocks`` blocks (1/3 double, as in FLUX.1)."""
    if hidden % 64:
        raise ConfigError(f"bench hidden={hidden} is not a multiple of 64: use e.g. 384, 1024 or 3072")
    if blocks < 2:
        raise ConfigError(f"bench blocks={blocks} is below 2: use at least one double and one single block")
    heads = hidden // 128 if hidden % 128 == 0 and hidden >= 1024 else hidden // 64
    depth = max(1, blocks // 3)
    big = hidden >= 3072
    return FluxConfig(arch="flux1", in_channels=64, vec_in_dim=768 if big else 64,
                      context_in_dim=4096 if big else hidden, hidden_size=hidden, num_heads=heads,
                      depth=depth, depth_single_blocks=blocks - depth,
                      axes_dim=default_axes_dim("flux1", hidden // heads), guidance_embed=True)


def _inputs(cfg: FluxConfig, tokens: int, txt_tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    side = max(1, int(tokens**0.5))
    h, w = side, max(1, tokens // side)
    g = torch.Generator().manual_seed(1)
    img_ids, txt_ids = position_ids("flux1", 1, h, w, txt_tokens)
    x = dict(img=torch.randn(1, h * w, cfg.in_channels, generator=g), img_ids=img_ids,
             txt=torch.randn(1, txt_tokens, cfg.context_in_dim, generator=g), txt_ids=txt_ids,
             timesteps=torch.tensor([0.5]), y=torch.randn(1, cfg.vec_in_dim, generator=g), guidance=torch.tensor([3.5]))
    return {k: v.to(device, dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.to(device)
            for k, v in x.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_ms(fn: Callable[[], Any], steps: int, device: torch.device) -> float:
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> tuple[float, str]:
    """Bytes/s of a host-to-device copy from pinned memory (CUDA), or of a host copy (CPU clone)."""
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        return nbytes / best, "host-to-device, pinned"
    src = torch.empty(nbytes // 4, dtype=torch.uint8).fill_(1)
    src.clone()
    t = min(_step_ms(src.clone, 1, device) for _ in range(repeats)) / 1000
    return (nbytes // 4) / t, "host copy (CPU clone)"


def _peak(device: torch.device, fallback: int) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else fallback


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_offload_bench(hidden: int | None = None, tokens: int | None = None, blocks: int | None = None,
                      windows: Sequence[int] = (1, 2, 4, 8), budget_fraction: float = 0.25, quick: bool = False,
                      steps: int | None = None, device: str | None = None, dtype: str | None = None,
                      txt_tokens: int | None = None, peer: bool = True) -> dict:
    """Step time, peak device memory and error of resident vs streamed weights, measured in one run."""
    dev = resolve_device(device)
    d_hidden, d_tokens, d_blocks, d_steps = _SIZES[(dev.type, quick)]
    hidden, tokens, blocks = hidden or d_hidden, tokens or d_tokens, blocks or d_blocks
    steps = steps or d_steps
    txt_tokens = txt_tokens or max(8, tokens // 8)
    torch_dtype = resolve_dtype(dev, dtype)
    if not 0 < budget_fraction <= 1:
        raise ConfigError(f"bench budget_fraction={budget_fraction} is outside (0, 1]: use e.g. 0.25")
    if any(w < 1 for w in windows):
        raise ConfigError(f"bench windows {list(windows)} contain a value below 1: use windows such as 1,2,4,8")
    cfg = bench_config(hidden, blocks)
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # one thread: a busy shared CPU then slows every row alike instead of at random
        torch.set_num_threads(1)
    try:
        return _run(cfg, dev, torch_dtype, hidden, tokens, txt_tokens, blocks, steps, windows, budget_fraction, peer)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: FluxConfig, dev: torch.device, torch_dtype: torch.dtype, hidden: int, tokens: int, txt_tokens: int,
         blocks: int, steps: int, windows: Sequence[int], budget_fraction: float, peer: bool) -> dict:
    model = build(cfg, "meta")
    # drawn on the compute device: a FLUX.1-dev-size model takes minutes to draw on a CPU
    model.load_state_dict(random_state_dict(cfg, seed=0, dtype=torch_dtype, device=dev), assign=True)
    model.eval()
    x = _inputs(cfg, tokens, txt_tokens, dev, torch_dtype)
    bandwidth, bw_kind = measure_bandwidth(dev)
    block_bytes = sum(p.numel() * p.element_size() for n in Flux.shard_unit for p in getattr(model, n).parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    rows: list[dict] = []
    with torch.inference_mode():
        # Resident: every weight on the device.
        model.to(dev)
        _reset_peak(dev)
        ref = model(**x)
        model(**x)  # warm: thread pools, allocator caches, kernels
        resident_ms = _step_ms(lambda: model(**x), steps, dev)
        rows.append(dict(setting="resident", window=None, step_ms=resident_ms, ratio_vs_resident=1.0,
                         peak_device_bytes=_peak(dev, total_bytes), resident_fraction=1.0, max_abs_diff=0.0,
                         streamed_bytes=0, bound_ms=resident_ms, ratio_vs_bound=1.0))
        model.to("cpu")
        if dev.type == "cuda":  # pin once, so that every offload row starts from the same host copies
            for p in model.parameters():
                p.data = p.data.pin_memory()
            torch.cuda.empty_cache()

        def offload_row(setting: str, **kw: Any) -> dict:
            try:
                off = AutoOffload(model, device=dev, **kw)
            except ConfigError as e:
                return dict(setting=setting, skipped=str(e))
            try:
                model(**x)  # traces
                model(**x)  # first streamed pass
                _reset_peak(dev)
                ms = _step_ms(lambda: model(**x), steps, dev)
                out = model(**x)
                st = off.stats()
            finally:
                off.detach()
            unit_peak = st["peak_device_bytes"] - st["trunk_bytes"]
            streamed = st["last_pass_bytes_loaded"]
            bound = max(resident_ms, streamed / bandwidth * 1000)
            return dict(setting=setting, window=st["window_size"], step_ms=ms, ratio_vs_resident=ms / resident_ms,
                        peak_device_bytes=_peak(dev, st["peak_device_bytes"]),
                        resident_fraction=unit_peak / block_bytes, max_abs_diff=float((out - ref).abs().max()),
                        streamed_bytes=streamed, bound_ms=bound, ratio_vs_bound=ms / bound)

        for w in windows:
            rows.append(offload_row(f"offload w={w}", window_size=w))
        trunk = total_bytes - block_bytes
        budget = int(trunk + budget_fraction * block_bytes)
        rows.append(offload_row(f"offload budget {budget_fraction:.0%}", max_device_bytes=budget))
        if peer:
            rows.append(_diffusers_row(model, x, dev, steps, ref, resident_ms, bandwidth, block_bytes))

    for r in rows:
        for k in ("step_ms", "ratio_vs_resident", "bound_ms", "ratio_vs_bound", "resident_fraction"):
            if isinstance(r.get(k), float):
                r[k] = round(r[k], 4)
    ok = [r for r in rows if r["setting"].startswith("offload") and "skipped" not in r
          and r["resident_fraction"] <= GOAL_RESIDENT]
    best = min(ok, key=lambda r: r["ratio_vs_bound"]) if ok else None
    return {"device": str(dev), "dtype": str(torch_dtype).removeprefix("torch."), "hidden": hidden, "tokens": tokens,
            "txt_tokens": txt_tokens, "blocks": blocks, "steps": steps, "block_bytes": block_bytes,
            "trunk_bytes": total_bytes - block_bytes, "bandwidth_bytes_per_s": round(bandwidth),
            "bandwidth_kind": bw_kind,
            "peak_device_bytes_measure": ("torch.cuda.max_memory_allocated (weights + activations)" if dev.type == "cuda"
                                          else "weight bytes held for the compute device (CPU)"),
            "goal": {"ratio_vs_bound_max": GOAL_RATIO, "resident_fraction_max": GOAL_RESIDENT,
                     "best_setting": best and best["setting"], "best_ratio_vs_bound": best and best["ratio_vs_bound"],
                     "met": bool(best and best["ratio_vs_bound"] <= GOAL_RATIO) if dev.type == "cuda" else None},
            "rows": rows}


def _diffusers_row(model: Flux, x: dict, dev: torch.device, steps: int, ref: torch.Tensor, resident_ms: float,
                   bandwidth: float, block_bytes: int) -> dict:
    """diffusers' block-level group offloading with a CUDA stream, on the same model (run last)."""
    setting = "diffusers group offload (use_stream)"
    try:
        from diffusers.hooks import apply_group_offloading
    except ImportError:
        return dict(setting=setting, skipped="skipped: diffusers not installed")
    if dev.type != "cuda":
        return dict(setting=setting, skipped="skipped: needs a CUDA device (use_stream=True)")
    try:
        apply_group_offloading(model, onload_device=dev, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        model(**x)
        model(**x)
        _reset_peak(dev)
        ms = _step_ms(lambda: model(**x), steps, dev)
        out = model(**x)
    except Exception as e:  # a peer failing is a result, not a crash of our benchmark
        return dict(setting=setting, skipped=f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    streamed = block_bytes  # every block crosses the link once per step
    bound = max(resident_ms, streamed / bandwidth * 1000)
    return dict(setting=setting, window=1, step_ms=ms, ratio_vs_resident=ms / resident_ms,
                peak_device_bytes=_peak(dev, 0), resident_fraction=None, max_abs_diff=float((out - ref).abs().max()),
                streamed_bytes=streamed, bound_ms=bound, ratio_vs_bound=ms / bound)


def format_table(result: dict) -> str:
    """The rows as a fixed-width text table, with the setup and bandwidth on top."""
    r = result
    head = (f"offload bench on {r['device']} ({r['dtype']}): hidden {r['hidden']}, {r['blocks']} blocks "
            f"({r['block_bytes'] / 1e6:.1f} MB), {r['tokens']}+{r['txt_tokens']} tokens, {r['steps']} steps; "
            f"bandwidth {r['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s ({r['bandwidth_kind']})")
    cols = ["setting", "window", "step_ms", "ratio_vs_resident", "peak_device_bytes", "resident_fraction",
            "max_abs_diff", "streamed_bytes", "bound_ms", "ratio_vs_bound"]

    def cell(r: dict, c: str) -> str:
        v = r.get(c)
        if v is None:
            return "-"
        if c == "max_abs_diff":
            return f"{v:.2e}"
        if c in ("peak_device_bytes", "streamed_bytes"):
            return f"{v / 1e6:.1f}M"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [[cell(r, c) for c in cols] for r in result["rows"] if "skipped" not in r]
    lines = [head, text_table(cols, rows)]
    lines += [f"{r['setting']}: {r['skipped']}" for r in result["rows"] if "skipped" in r]
    g = result["goal"]
    if g["best_setting"]:
        met = "n/a on CPU" if g["met"] is None else ("met" if g["met"] else "NOT met")
        lines.append(f"goal ratio_vs_bound <= {g['ratio_vs_bound_max']} at resident_fraction <= "
                     f"{g['resident_fraction_max']}: best {g['best_setting']} {g['best_ratio_vs_bound']} ({met})")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m mesh_ray.bench.offload [--quick] [--json]
    import sys

    res = run_offload_bench(quick="--quick" in sys.argv)
    print(format_table(res), file=sys.stderr)
    if "--json" in sys.argv:
        print(json.dumps(res))
