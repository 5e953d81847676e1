"""Measure what the planner needs, in this process: one block's time, free memory, the caller's front.

Blocks are timed with seeded random weights of the checkpoint's shapes (speed does not depend on
the values), at the token count of the planned image size.  No Ray here (``actors/probe.py`` runs
this on candidate devices), so a bare GPU machine can measure and another machine can plan.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from mesh_ray.actors.device import pick_device
from mesh_ray.errors import ConfigError
from mesh_ray.models.flux import BlockState, Flux, FluxConfig, build, position_ids

CPU_WORK_FACTOR = 16  # activation elements per token and hidden unit a running block may hold (CPU estimate)


def tokens_for(width: int, height: int) -> int:
    """Image tokens of a width x height image (2x2 patches of the 8x-downsampled latent)."""
    if width % 16 or height % 16:
        raise ConfigError(f"image size {width}x{height} is not a multiple of 16: use e.g. {width // 16 * 16}x{height // 16 * 16}")
    return (width // 16) * (height // 16)


def _materialise(model: Flux, device: torch.device, dtype: torch.dtype, blocks: list[int], seed: int = 0) -> None:
    """Give the non-block modules and the listed blocks seeded random weights on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    mods = [m for n, m in model.named_children() if n not in ("double_blocks", "single_blocks")]
    mods += [model.block(b) for b in blocks]
    for mod in mods:
        mod.to_empty(device=device)
        for name, p in mod.named_parameters():
            val = torch.ones(p.shape) if name.endswith(".scale") else torch.randn(p.shape, generator=gen) * 0.02
            p.data.copy_(val.to(dtype))


def _inputs(cfg: FluxConfig, img_tokens: int, txt_tokens: int, device: torch.device, dtype: torch.dtype) -> list:
    """Seeded forward inputs (img, img_ids, txt, txt_ids, t, y, guidance) for ``img_tokens`` image tokens."""
    gen = torch.Generator().manual_seed(1)
    side = max(1, int(img_tokens**0.5))
    while img_tokens % side:
        side -= 1
    img_ids, txt_ids = position_ids(cfg.arch, 1, side, img_tokens // side, txt_tokens, device=device)
    img = torch.randn(1, img_tokens, cfg.in_channels, generator=gen).to(device, dtype)
    txt = torch.randn(1, txt_tokens, cfg.context_in_dim, generator=gen).to(device, dtype)
    y = torch.randn(1, cfg.vec_in_dim, generator=gen).to(device, dtype) if cfg.vec_in_dim else None
    g = torch.full((1,), 3.5, device=device, dtype=dtype) if cfg.guidance_embed else None
    return [img, img_ids, txt, txt_ids, torch.full((1,), 0.5, device=device, dtype=dtype), y, g]


def _timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Median ms of ``fn()`` after one warm-up call (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def measure_blocks(cfg: FluxConfig, img_tokens: int, txt_tokens: int, dtype: str = "auto", repeats: int = 3,
                   device: tuple[torch.device, torch.dtype] | None = None) -> dict:
    """In this process: ms of one double and one single block, free and working memory, host-to-device speed."""
    device, dt = device or pick_device(dtype)
    model = build(cfg, "meta", dt)
    firsts = ([0] if cfg.depth else []) + ([cfg.depth] if cfg.depth_single_blocks else [])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _materialise(model, device, dt, firsts)
    img, img_ids, txt, txt_ids, t, y, g = _inputs(cfg, img_tokens, txt_tokens, device, dt)
    cond = model.conditioning(t, y, g, dtype=dt)
    pe = model.embed_positions(img_ids, txt_ids)
    state = BlockState(model.img_in(img), model.embed_text(txt), txt_tokens)
    joined = state.join()
    ms = {}
    for b in firsts:
        start = joined if b >= cfg.depth else state
        ms["double" if b < cfg.depth else "single"] = _timed(lambda: model.run_blocks(start, cond, pe, b, b + 1),
                                                             device, repeats)
    ms.setdefault("double", ms.get("single"))
    ms.setdefault("single", ms.get("double"))
    elems = (img_tokens + txt_tokens) * cfg.hidden_size
    if device.type == "cuda":
        resident = sum(p.numel() * p.element_size() for b in firsts for p in model.block(b).parameters())
        work = max(0, torch.cuda.max_memory_allocated() - resident)
        del model, state, joined, cond, pe
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
        dev = torch.empty_like(host, device=device)
        copy_ms = _timed(lambda: dev.copy_(host, non_blocking=True), device, repeats)
        h2d = host.numel() / (copy_ms / 1000)
        name = torch.cuda.get_device_name(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
        work = CPU_WORK_FACTOR * elems * torch.finfo(dt).bits // 8
        h2d = None
        name = f"cpu ({torch.get_num_threads()} threads)"
    return {"double_ms": ms["double"], "single_ms": ms["single"], "free_bytes": int(free), "work_bytes": int(work),
            "h2d_bytes_per_s": h2d, "device": name, "dtype": str(dt).removeprefix("torch."),
            "activation_bytes": elems * torch.finfo(dt).bits // 8}


def _front_setup(cfg: FluxConfig, img_tokens: int, txt_tokens: int, dtype: str,
                 device: tuple[torch.device, torch.dtype] | None, driver: bool) -> tuple:
    """A model with only its front materialised, its inputs and a last-block output to finish."""
    device, dt = device or pick_device(dtype, driver=driver)
    model = build(cfg, "meta", dt)
    _materialise(model, device, dt, [])
    args = _inputs(cfg, img_tokens, txt_tokens, device, dt)
    out = BlockState(torch.randn(1, img_tokens + txt_tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
                     .to(device, dt), None, txt_tokens)
    return model, device, dt, args, out


@torch.inference_mode()
def measure_front(cfg: FluxConfig, img_tokens: int, txt_tokens: int, dtype: str = "auto", repeats: int = 3,
                  device: tuple[torch.device, torch.dtype] | None = None) -> float:
    """ms per step of the caller's part: input checks, conditioning, image embedder and final layer."""
    model, device, dt, (img, img_ids, txt, txt_ids, t, y, g), out = _front_setup(cfg, img_tokens, txt_tokens, dtype,
                                                                                device, True)

    def front() -> None:
        model.check_inputs(img, img_ids, txt, txt_ids, t, y, g)
        cond = model.conditioning(t, y, g, dtype=dt)
        model.img_in(img)
        model.finish(out, cond)

    return _timed(front, device, repeats)


@torch.inference_mode()
def measure_front_parts(cfg: FluxConfig, img_tokens: int, txt_tokens: int, dtype: str = "auto", repeats: int = 3,
                        device: tuple[torch.device, torch.dtype] | None = None) -> dict:
    """On a stage's device: ms of the embedders (conditioning, image embedder) and of the final layer
    per step, what the first and last stage add with ``SplitOptions.front="stage"``."""
    model, device, dt, (img, _ii, _txt, _ti, t, y, g), out = _front_setup(cfg, img_tokens, txt_tokens, dtype, device,
                                                                          False)
    cond = model.conditioning(t, y, g, dtype=dt)
    return {"embed_ms": _timed(lambda: (model.conditioning(t, y, g, dtype=dt), model.img_in(img)), device, repeats),
            "final_ms": _timed(lambda: model.finish(out, cond), device, repeats)}


__all__ = ["measure_blocks", "measure_front", "measure_front_parts", "tokens_for"]
