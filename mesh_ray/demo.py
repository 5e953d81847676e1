"""``mesh-ray demo``: a seeded tiny FLUX checkpoint split over stages on an embedded Ray, compared with one process."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mesh_ray.mesh import connect
from mesh_ray.models.checkpoint import inspect, load_blocks, write_random_checkpoint
from mesh_ray.models.flux import build
from mesh_ray.preview import latent_to_rgb, save_png
from mesh_ray.sampler import generate, random_conditioning


def _timed_generate(model: Any, txt: torch.Tensor, y: torch.Tensor | None, *, size: int, steps: int, seed: int,
                    progress: bool, on_step: Any = None) -> tuple[torch.Tensor, float]:
    """Generate and return (latent, mean ms per sampler step)."""
    marks: list[float] = []

    def cb(i: int, n: int, _x: torch.Tensor) -> None:
        marks.append(time.perf_counter())
        if on_step:
            on_step()

    t0 = time.perf_counter()
    latent = generate(model, txt, y, width=size, height=size, steps=steps, seed=seed, progress=progress, callback=cb)
    return latent, (marks[-1] - t0) * 1000 / steps


def run_demo(arch: str = "flux1", stages: int = 2, steps: int = 4, size: int = 256, seed: int = 0,
             out_dir: str | os.PathLike = "out", progress: bool = True) -> dict:
    """Generate one image split over ``stages`` stage actors and the same image in this process."""
    with tempfile.TemporaryDirectory(prefix="mesh-ray-demo-") as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / f"tiny-{arch}.safetensors", f"tiny-{arch}", seed=seed)
        info = inspect(ckpt)
        mesh = connect(num_cpus=max(os.cpu_count() or 1, stages + 1))
        txt, y = random_conditioning(info.config, batch=1, txt_len=16, seed=seed)
        split = mesh.split(str(ckpt), stages=stages)
        bytes_per_step = []
        try:
            latent_split, ms_split = _timed_generate(split, txt, y, size=size, steps=steps, seed=seed, progress=progress,
                                                     on_step=lambda: bytes_per_step.append(split.last.bytes))
            hops = split.last.hops
        finally:
            split.close()
        local = build(info.config, "meta")
        local.load_state_dict(load_blocks(ckpt, ["all"], non_block=True, info=info), assign=True)
        latent_local, ms_local = _timed_generate(local, txt, y, size=size, steps=steps, seed=seed, progress=progress)
    image = save_png(latent_to_rgb(latent_split[0]), Path(out_dir) / f"demo-{arch}-{stages}stages.png",
                     {"mesh_ray.arch": arch, "mesh_ray.stages": str(stages), "mesh_ray.seed": str(seed),
                      "mesh_ray.note": "latent preview of a random-weight tiny model"})
    return {"arch": arch, "stages": stages, "steps": steps, "size": size, "seed": seed,
            "max_abs_diff_vs_local": float((latent_split - latent_local).abs().max()),
            "step_ms_split": round(ms_split, 3), "step_ms_local": round(ms_local, 3),
            "bytes_per_step": int(sum(bytes_per_step) / max(1, len(bytes_per_step))), "hops_per_step": hops,
            "image_path": str(image.resolve())}
