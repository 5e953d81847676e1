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
from mesh_ray.models.vae import write_random_vae
from mesh_ray.models.images import latent_to_rgb, save_images, write_png
from mesh_ray.split.sampler import generate, random_conditioning


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


def _decode_remote(mesh: Any, vae_path: Path, latent: torch.Tensor, mode: str, out_dir: Path, meta: dict,
                   timeout_s: float = 300) -> dict:
    """Decode through a VAE decoder actor in ``mode``; returns the files written and the caller's blocked ms."""
    service = mesh.vae(str(vae_path), replicas=1, output_dir=str(out_dir), timeout_s=timeout_s)
    try:
        t0 = time.perf_counter()
        if mode == "wait":
            images = service.decode(latent, mode="wait")
            blocked = (time.perf_counter() - t0) * 1000
            paths = save_images(images, out_dir / "demo-vae-wait.png", meta)
        elif mode == "forget":
            request = service.decode(latent, mode="forget", save="demo-vae-forget", metadata=meta)
            blocked = (time.perf_counter() - t0) * 1000
            service.drain(timeout_s)
            paths = sorted(out_dir.glob(f"demo-vae-forget_{request}_*.png"))
        else:
            promise = service.decode(latent, mode="promise")
            handle = promise.save(out_dir / "demo-vae-promise.png", metadata=meta)
            blocked = (time.perf_counter() - t0) * 1000
            paths = handle.result(timeout_s)
        return {"vae": mode, "vae_blocked_ms": round(blocked, 3), "image_paths": [str(Path(p).resolve()) for p in paths],
                "vae_failures": service.stats().get("failed", 0)}
    finally:
        service.close()


def run_demo(arch: str = "flux1", stages: int = 2, steps: int = 4, size: int = 256, seed: int = 0,
             out_dir: str | os.PathLike = "out", progress: bool = True, codec: str | None = None,
             qp: int | None = None, vae: str | None = None) -> dict:
    """Generate one image split over ``stages`` stage actors and the same image in this process.

    With ``codec`` (raw | quant8 | hevc | auto) every link codes its activations; the result then
    also reports the raw bytes the same hops would carry and the difference against a raw split.
    With ``vae`` (wait | forget | promise) the latent is decoded by a VAE decoder actor (a seeded
    tiny FLUX VAE) in that mode; otherwise the PNG is a latent preview.
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
        meta = {"mesh_ray.arch": arch, "mesh_ray.stages": str(stages), "mesh_ray.seed": str(seed),
                "mesh_ray.codec": json.dumps(spec), "mesh_ray.note": "random-weight tiny model"}
        decoded: dict = {}
        if vae:
            vae_path = write_random_vae(Path(tmp) / "ae.safetensors", f"tiny-{arch}", seed=seed)
            decoded = _decode_remote(mesh, vae_path, latent_split, vae, Path(out_dir), meta)
    image = write_png(latent_to_rgb(latent_split[0]), Path(out_dir) / f"demo-{arch}-{stages}stages.png",
                     {**meta, "mesh_ray.note": "latent preview of a random-weight tiny model"})
    n = max(1, len(per_step))
    return {"arch": arch, "stages": stages, "steps": steps, "size": size, "seed": seed, "codec": spec["mode"],
            "qp": qp, "max_abs_diff_vs_local": float((latent_split - latent_local).abs().max()),
            "max_abs_diff_vs_raw_split": float((latent_split - latent_raw).abs().max()),
            "step_ms_split": round(ms_split, 3), "step_ms_local": round(ms_local, 3),
            "bytes_per_step": sum(s.bytes for s in per_step) // n,
            "raw_bytes_per_step": sum(s.raw_bytes for s in per_step) // n,
            "hops_per_step": per_step[-1].hops if per_step else 0,
            "encode_ms_per_step": round(sum(t.encode_ms for s in per_step for t in s.transfers) / n, 3),
            "decode_ms_per_step": round(sum(t.decode_ms or 0 for s in per_step for t in s.transfers) / n, 3),
            "image_path": decoded["image_paths"][0] if decoded.get("image_paths") else str(image.resolve()),
            "latent_preview_path": str(image.resolve()), **decoded}
