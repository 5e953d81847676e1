"""``mesh-ray demo``: a seeded tiny FLUX checkpoint split over stages on an embedded Ray, compared with one process."""

from __future__ import annotations

import json
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


def _split_generate(mesh: Any, ckpt: Path, stages: int, codec: dict, txt: torch.Tensor, y: torch.Tensor | None, *,
                    size: int, steps: int, seed: int, progress: bool) -> tuple[torch.Tensor, float, list]:
    """Generate through a split; returns (latent, ms per step, the transfers of every step)."""
    split = mesh.split(str(ckpt), stages=stages, codec=codec)
    per_step: list = []
    try:
        latent, ms = _timed_generate(split, txt, y, size=size, steps=steps, seed=seed, progress=progress,
                                     on_step=lambda: per_step.append(split.last))
    finally:
        split.close()
    return latent, ms, per_step


def run_demo(arch: str = "flux1", stages: int = 2, steps: int = 4, size: int = 256, seed: int = 0,
             out_dir: str | os.PathLike = "out", progress: bool = True, codec: str | None = None,
             qp: int | None = None) -> dict:
    """Generate one image split over ``stages`` stage actors and the same image in this process.

    With ``codec`` (raw | quant8 | hevc | auto) every link codes its activations; the result then
    also reports the raw bytes the same hops would carry and the difference against a raw split.
    """
    spec = {"mode": codec or "raw", **({"qp": qp} if qp is not None else {})}
    with tempfile.TemporaryDirectory(prefix="mesh-ray-demo-") as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / f"tiny-{arch}.safetensors", f"tiny-{arch}", seed=seed)
        info = inspect(ckpt)
        mesh = connect(num_cpus=max(os.cpu_count() or 1, stages + 1))
        txt, y = random_conditioning(info.config, batch=1, txt_len=16, seed=seed)
        gen_kw = dict(size=size, steps=steps, seed=seed, progress=progress)
        latent_split, ms_split, per_step = _split_generate(mesh, ckpt, stages, spec, txt, y, **gen_kw)
        local = build(info.config, "meta")
        local.load_state_dict(load_blocks(ckpt, ["all"], non_block=True, info=info), assign=True)
        latent_local, ms_local = _timed_generate(local, txt, y, **gen_kw)
        latent_raw = latent_split
        if spec["mode"] != "raw":
            latent_raw, _, _ = _split_generate(mesh, ckpt, stages, {"mode": "raw"}, txt, y, **gen_kw)
    image = save_png(latent_to_rgb(latent_split[0]), Path(out_dir) / f"demo-{arch}-{stages}stages.png",
                     {"mesh_ray.arch": arch, "mesh_ray.stages": str(stages), "mesh_ray.seed": str(seed),
                      "mesh_ray.codec": json.dumps(spec), "mesh_ray.note": "latent preview of a random-weight tiny model"})
    n = max(1, len(per_step))
    return {"arch": arch, "stages": stages, "steps": steps, "size": size, "seed": seed, "codec": spec["mode"],
            "qp": qp, "max_abs_diff_vs_local": float((latent_split - latent_local).abs().max()),
            "max_abs_diff_vs_raw_split": float((latent_split - latent_raw).abs().max()),
            "step_ms_split": round(ms_split, 3), "step_ms_local": round(ms_local, 3),
            "bytes_per_step": sum(s.bytes for s in per_step) // n,
            "raw_bytes_per_step": sum(s.raw_bytes for s in per_step) // n,
            "hops_per_step": per_step[-1].hops if per_step else 0,
            "encode_ms_per_step": round(sum(t["encode_ms"] for s in per_step for t in s.transfers) / n, 3),
            "decode_ms_per_step": round(sum(t["decode_ms"] or 0 for s in per_step for t in s.transfers) / n, 3),
            "image_path": str(image.resolve())}
