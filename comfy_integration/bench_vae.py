"""``mesh-ray bench comfy-vae``: the ComfyUI process's peak memory while a VAE decodes, with ComfyUI's own
``VAE Decode`` in the process vs ``Mesh VAE Decode`` (wait mode) on a decoder actor, side by side.

For a small LTX-architecture video VAE and a FLUX.1 VAE built through ComfyUI's classes
(``small_vaes``), each variant runs ``repeats`` times, alternating, after one warm-up each.  Around
every run a thread samples this process every millisecond:

* ``heap``: bytes malloc has handed out (glibc ``mallinfo2``: in-use chunks + mmapped blocks), the
  allocator's own count of what the decode allocated here (torch's CPU tensors come from malloc);
* ``rss``: resident memory, which also counts the pages of Ray's shared-memory object store this
  process maps while it reads the decoded frames;
* ``cuda``: ``torch.cuda.max_memory_allocated`` growth when the process decodes on a GPU.

Each figure is the peak above the value just before the run (``malloc_trim`` first, so memory freed by
an earlier run is not reused unseen); the median over repeats is reported, with the decoded output's
own size for scale.  Sampling can miss a spike shorter than a millisecond; the heap count cannot be
fooled by memory kept in malloc's free lists.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mesh_ray.bench.soak import malloc_in_use, rss

MB = 1024 * 1024


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakSampler:
    """Peak growth of heap bytes, RSS and CUDA memory of this process while the ``with`` block runs."""

    def __init__(self, period_s: float = 0.001):
        self.period_s = period_s

    def __enter__(self) -> "PeakSampler":
        _trim()
        self.heap0, self.rss0 = malloc_in_use() or 0, rss()
        self.heap, self.rss = self.heap0, self.rss0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda0 = torch.cuda.memory_allocated()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-ray-peak", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.heap = max(self.heap, malloc_in_use() or 0)
        self.rss = max(self.rss, rss())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.period_s)

    def __exit__(self, *exc: Any) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()
        self._sample()
        self.result = {"heap_mb": (self.heap - self.heap0) / MB, "rss_mb": (self.rss - self.rss0) / MB}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.result["cuda_mb"] = (torch.cuda.max_memory_allocated() - self.cuda0) / MB


def _measure(run: Callable[[], torch.Tensor]) -> dict:
    with PeakSampler() as peak:
        t0 = time.perf_counter()
        out = run()
        ms = (time.perf_counter() - t0) * 1000
    del out
    return {**peak.result, "ms": ms}


def _cases(frames: int, size: int, flux_size: int, ltx_channels: int, flux_ch: int) -> list[dict]:
    """(name, ComfyUI VAE, latent) for the small LTX video VAE and the FLUX.1 VAE."""
    import nodes

    import folder_paths

    from .small_vaes import LTX_VIDEO_VAE, flux_vae, write_ltx_video_vae

    cfg = {**LTX_VIDEO_VAE, "decoder_base_channels": ltx_channels}
    write_ltx_video_vae(os.path.join(folder_paths.get_folder_paths("vae")[0], "bench-ltx.safetensors"), 0, cfg)
    (ltx,) = nodes.VAELoader().load_vae("bench-ltx.safetensors")
    g = torch.Generator().manual_seed(0)
    f = (frames - 1) // 8 + 1
    return [{"vae_name": "ltx-video", "vae": ltx, "latent": torch.randn(1, 128, f, size // 32, size // 32, generator=g),
             "prompt": {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "bench-ltx.safetensors"}},
                        "9": {"class_type": "MeshVAEDecode", "inputs": {"vae": ["1", 0]}}}},
            {"vae_name": "flux1", "vae": flux_vae("flux1", 0, flux_ch),
             "latent": torch.randn(1, 16, flux_size // 8, flux_size // 8, generator=g), "prompt": None}]


def run_comfy_vae_bench(comfy_path: str | None = None, frames: int = 25, size: int = 256, flux_size: int = 512,
                        ltx_channels: int = 32, flux_ch: int = 64, repeats: int = 3) -> dict:
    """Peak heap / RSS / CUDA growth of this ComfyUI process: VAE Decode here vs Mesh VAE Decode (wait) remote."""
    from mesh_ray.errors import ConfigError

    path = comfy_path or os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy" / "model_patcher.py").is_file():
        raise ConfigError(f"no ComfyUI source tree at {path!r}: pass --comfyui-path or set COMFYUI_PATH")
    if frames < 1 or (frames - 1) % 8 or size % 32 or flux_size % 8:
        raise ConfigError(f"frames {frames}, size {size}, flux size {flux_size}: use frames = 8k+1 (LTX), a size "
                          f"divisible by 32 and a FLUX size divisible by 8")
    with tempfile.TemporaryDirectory(prefix="mesh-ray-bench-comfy-vae-") as tmp:
        os.environ.setdefault("MESH_RAY_CACHE_DIR", str(Path(tmp) / "cache" / "shards"))
        from .standalone import boot

        stubs = Path(path).resolve().parent / "comfyui-stubs"
        boot(path, tmp, stubs if stubs.is_dir() else None, cpu=not torch.cuda.is_available())
        import comfy.model_management as mm
        import nodes

        from .nodes_mesh import MeshConnect
        from .nodes_vae import MeshVAEDecode

        mesh, = MeshConnect().connect("")
        rows = []
        for case in _cases(frames, size, flux_size, ltx_channels, flux_ch):
            vae, latent = case["vae"], case["latent"]

            def local() -> torch.Tensor:
                with torch.inference_mode():
                    return nodes.VAEDecode().decode(vae, {"samples": latent})[0]

            def remote() -> torch.Tensor:
                return MeshVAEDecode().decode({"samples": latent}, mesh, "(the vae input)", "wait", 1, 0.0, vae=vae,
                                              prompt=case["prompt"], unique_id="9")["result"][0]

            ref, got = local(), remote()  # warm-up: pools, weights shipped, first-call allocations
            diff = float((ref - got).abs().max())
            out_mb = ref.numel() * ref.element_size() / MB
            del ref, got
            runs: dict[str, list[dict]] = {"local": [], "remote": []}
            for _ in range(repeats):  # alternating: both see the same machine state
                for name, fn in (("local", local), ("remote", remote)):
                    runs[name].append(_measure(fn))
                    mm.soft_empty_cache()
            row = {"vae": case["vae_name"], "latent": list(latent.shape), "output_mb": round(out_mb, 1),
                   "max_abs_diff": diff}
            for name, acc in runs.items():
                for key in acc[0]:
                    row[f"{key}_{name}"] = round(statistics.median(r[key] for r in acc), 1)
            for key in ("heap_mb", "rss_mb", "cuda_mb"):
                if f"{key}_local" in row and row[f"{key}_local"] > 0:
                    row[f"{key}_ratio_remote_over_local"] = round(row[f"{key}_remote"] / row[f"{key}_local"], 3)
            rows.append(row)
        mesh.close()
    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "frames": frames, "size": size,
            "flux_size": flux_size, "repeats": repeats, "rows": rows}


def format_table(result: dict) -> str:
    """The people-facing table: one row per VAE, local vs remote peak growth of this process."""
    from mesh_ray.tables import text_table

    cuda = any("cuda_mb_local" in r for r in result["rows"])
    head = ["vae", "output MB", "heap MB local", "heap MB remote", "ratio", "RSS MB local", "RSS MB remote", "ratio"]
    head += ["CUDA MB local", "CUDA MB remote"] if cuda else []
    head += ["ms local", "ms remote", "max diff"]
    body = []
    for r in result["rows"]:
        line = [r["vae"], r["output_mb"], r["heap_mb_local"], r["heap_mb_remote"], r.get("heap_mb_ratio_remote_over_local"),
                r["rss_mb_local"], r["rss_mb_remote"], r.get("rss_mb_ratio_remote_over_local")]
        line += [r["cuda_mb_local"], r["cuda_mb_remote"]] if cuda else []
        line += [round(r["ms_local"]), round(r["ms_remote"]), r["max_abs_diff"]]
        body.append(line)
    title = (f"ComfyUI process peak memory growth during a decode ({result['device']}, LTX {result['frames']} frames "
             f"at {result['size']}px, FLUX at {result['flux_size']}px, median of {result['repeats']})")
    return text_table(head, body, title)


__all__ = ["PeakSampler", "format_table", "run_comfy_vae_bench"]
