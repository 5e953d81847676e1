"""Measure what the planner needs: one block's time and the free memory of each candidate device, and the caller's front.

Blocks are timed with seeded random weights of the checkpoint's shapes (speed does not depend on
the values), at the token count of the planned image size.  On a CPU machine each candidate is a
stage with its own torch thread count: threads stand in for device speed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import ray
import torch

from mesh_ray.actors.device import pick_device
from mesh_ray.cluster import node_affinity
from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.models.flux import BlockState, Flux, FluxConfig, build, position_ids
from mesh_ray.planner import DeviceProfile

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
def measure_blocks(cfg: FluxConfig, img_tokens: int, txt_tokens: int, dtype: str = "auto", repeats: int = 3) -> dict:
    """In this process: ms of one double and one single block, free and working memory, host-to-device speed."""
    device, dt = pick_device(dtype)
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
            "node_ip": ray.util.get_node_ip_address() if ray.is_initialized() else None,
            "activation_bytes": elems * torch.finfo(dt).bits // 8}


@torch.inference_mode()
def measure_front(cfg: FluxConfig, img_tokens: int, txt_tokens: int, dtype: str = "auto", repeats: int = 3) -> float:
    """ms per step of the caller's part: input checks, conditioning, image embedder and final layer."""
    device, dt = pick_device(dtype)
    model = build(cfg, "meta", dt)
    _materialise(model, device, dt, [])
    img, img_ids, txt, txt_ids, t, y, g = _inputs(cfg, img_tokens, txt_tokens, device, dt)
    out = BlockState(torch.randn(1, img_tokens + txt_tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
                     .to(device, dt), None, txt_tokens)

    def front() -> None:
        model.check_inputs(img, img_ids, txt, txt_ids, t, y, g)
        cond = model.conditioning(t, y, g, dtype=dt)
        model.img_in(img)
        model.finish(out, cond)

    return _timed(front, device, repeats)


class ProbeClass:
    """A short-lived actor on one candidate device: times one block of each kind there."""

    def __init__(self, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)

    def measure(self, cfg: FluxConfig, img_tokens: int, txt_tokens: int, dtype: str, repeats: int) -> dict:
        return measure_blocks(cfg, img_tokens, txt_tokens, dtype, repeats)

    def echo(self, x: Any) -> Any:
        return x


ProbeActor = ray.remote(ProbeClass)


def candidates(stages: int | None = None, threads: list[int] | None = None) -> list[dict]:
    """StageSpec fields of each candidate device: one per GPU in the cluster, else ``stages`` CPU stages."""
    gpus = []
    for node in ray.nodes():
        if node["Alive"]:
            gpus += [{"num_gpus": 1.0, "node": node["NodeManagerAddress"]}] * int(node["Resources"].get("GPU", 0))
    if gpus and not threads:
        if stages is not None and stages > len(gpus):
            raise ConfigError(f"{stages} stages asked for but the cluster has {len(gpus)} GPUs: use at most {len(gpus)}")
        return gpus[: stages or len(gpus)]
    threads = threads or [1] * (stages or 2)
    if stages is not None and len(threads) != stages:
        raise ConfigError(f"{len(threads)} thread counts for {stages} stages: give one per stage")
    return [{"num_gpus": 0.0, "torch_threads": t} for t in threads]


def profile_devices(cfg: FluxConfig, fields: list[dict], img_tokens: int, txt_tokens: int, dtype: str = "auto",
                    repeats: int = 3, timeout_s: float = 600) -> tuple[list[DeviceProfile], float]:
    """Profile every candidate one after the other (each alone on the machine); also the link ms of one hop."""
    actors = []
    try:
        for f in fields:
            opts: dict[str, Any] = {"num_cpus": f.get("num_cpus", 1), "num_gpus": f.get("num_gpus", 0)}
            if f.get("node"):
                opts["scheduling_strategy"] = node_affinity(f["node"])
            actors.append(ProbeActor.options(**opts).remote(f.get("torch_threads")))
        profiles, link_ms = [], 0.0
        for i, (f, a) in enumerate(zip(fields, actors)):
            try:
                m = ray.get(a.measure.remote(cfg, img_tokens, txt_tokens, dtype, repeats), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise ClusterError(f"candidate {i} ({f}) did not finish its measurement within {timeout_s:.0f}s: "
                                   f"check `mesh-ray status` for free resources") from None
            where = f" @ {m['node_ip']}" if f.get("node") else ""
            profiles.append(DeviceProfile(name=f"{i}: {m['device']}{where}", double_ms=m["double_ms"],
                                          single_ms=m["single_ms"], free_bytes=m["free_bytes"], work_bytes=m["work_bytes"],
                                          h2d_bytes_per_s=m["h2d_bytes_per_s"], stage=dict(f)))
            if i == 0:
                act = torch.zeros(m["activation_bytes"] // 4, dtype=torch.float32)
                ray.get(a.echo.remote(act), timeout=timeout_s)
                t0 = time.perf_counter()
                ray.get(a.echo.remote(act), timeout=timeout_s)
                link_ms = (time.perf_counter() - t0) * 1000 / 2
        return profiles, link_ms
    finally:
        for a in actors:
            ray.kill(a)


def share_host_memory(profiles: list[DeviceProfile]) -> list[DeviceProfile]:
    """CPU candidates on one node share its host memory: give each an equal part."""
    by_node: dict[str, list[int]] = {}
    for i, p in enumerate(profiles):
        if p.h2d_bytes_per_s is None:
            by_node.setdefault(str(p.stage.get("node")), []).append(i)
    out = list(profiles)
    for idx in by_node.values():
        for i in idx:
            if out[i].free_bytes is not None:
                out[i] = out[i].model_copy(update={"free_bytes": out[i].free_bytes // len(idx)})
    return out


__all__ = ["candidates", "measure_blocks", "measure_front", "profile_devices", "share_host_memory", "tokens_for"]
