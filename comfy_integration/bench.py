"""``mesh-ray bench comfy --arch flux1|flux2|ltxav|wan|qwen``: the real ComfyUI KSampler, unsplit vs
Mesh Split Model (raw, ComfyUI's own blocks on one stage actor in another process), side by side.

Per architecture, a model narrower than the released one (``--hidden``, head size 128 as released)
is built through ComfyUI's own classes.  Reported: the median step time of each, interleaved, and
their ratio; the bytes each step moves between the processes; what ComfyUI's model management
loads in this process; this process's peak memory while sampling (above its level before) unsplit
vs split; and max |split - unsplit| (0: bit-exact).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ARCHS = ("flux1", "flux2", "ltxav", "wan", "qwen")


def bench_config(arch: str, hidden: int, blocks: int) -> dict:
    """``unet_config`` overrides of ``comfy_integration.tiny``'s model at width ``hidden`` with ``blocks`` blocks."""
    heads = max(1, hidden // 128)
    head = hidden // heads
    if arch == "flux1":
        return dict(vec_in_dim=32, context_in_dim=hidden, hidden_size=hidden, num_heads=heads, depth=blocks // 3,
                    depth_single_blocks=blocks - blocks // 3, axes_dim=[head // 8, 7 * head // 16, 7 * head // 16])
    if arch == "flux2":
        return dict(hidden_size=hidden, num_heads=heads, depth=blocks // 3, depth_single_blocks=blocks - blocks // 3,
                    axes_dim=[head // 4] * 4, context_in_dim=hidden)
    if arch == "ltxav":
        return dict(num_layers=blocks, attention_head_dim=head, num_attention_heads=heads, cross_attention_dim=hidden,
                    audio_attention_head_dim=head, audio_num_attention_heads=heads, audio_cross_attention_dim=hidden,
                    connector_attention_head_dim=head, connector_num_attention_heads=heads)
    if arch == "wan":
        return dict(dim=hidden, ffn_dim=4 * hidden, num_heads=heads, num_layers=blocks)
    if arch == "qwen":
        return dict(num_layers=blocks, attention_head_dim=head, num_attention_heads=heads,
                    axes_dims_rope=(head // 8, 7 * head // 16, 7 * head // 16))
    raise ValueError(arch)


def _inputs(arch: str, size: int, hidden: int, txt_tokens: int) -> tuple[list, list, dict]:
    """The tiny module's inputs at bench size: (size/2)^2 image tokens, ``txt_tokens`` text tokens."""
    import comfy.nested_tensor

    from comfy_integration import tiny

    pos, neg, latent = tiny.inputs(arch, size=size)
    ctx = {"flux1": hidden, "flux2": hidden}.get(arch, tiny.CONTEXT[arch])
    g = torch.Generator().manual_seed(1)
    for cond in (pos, neg):
        cond[0][0] = torch.randn(1, txt_tokens, ctx, generator=g)
    if arch == "ltxav":  # video latent at /32 per side, 2 latent frames; audio 16 latent frames
        latent["samples"] = comfy.nested_tensor.NestedTensor((torch.zeros(1, 128, 2, size // 4, size // 4),
                                                              torch.zeros(1, 8, 16, 16)))
    return pos, neg, latent


class PeakRSS:
    """This process's peak resident memory while a block of code runs (sampled every 2 ms)."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = 0

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def above(self) -> int:
        return self.peak - self.base


def run_comfy_bench(comfy_path: str | None = None, arch: str = "flux1", hidden: int = 512, blocks: int = 6,
                    size: int = 64, txt_tokens: int = 64, steps: int = 3, repeats: int = 3) -> dict:
    """Median per-step ms of ComfyUI's KSampler unsplit vs split (half the blocks on one stage, raw),
    bytes per step, loaded bytes and peak memory of this process both ways."""
    from mesh_ray.errors import ConfigError

    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch} is not known: use one of {', '.join(ARCHS)}")
    path = comfy_path or os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy" / "model_patcher.py").is_file():
        raise ConfigError(f"no ComfyUI source tree at {path!r}: pass --comfyui-path or set COMFYUI_PATH")
    with tempfile.TemporaryDirectory(prefix="mesh-ray-bench-comfy-") as tmp:
        os.environ.setdefault("MESH_RAY_CACHE_DIR", str(Path(tmp) / "cache" / "shards"))
        from comfy_integration.standalone import boot

        stubs = Path(path).resolve().parent / "comfyui-stubs"
        boot(path, tmp, stubs if stubs.is_dir() else None, cpu=not torch.cuda.is_available())
        import comfy.model_management as mm
        import nodes

        from comfy_integration import tiny
        from comfy_integration.nodes_mesh import MeshConnect, MeshSplitModel, close_all_splits, remote_of

        model = tiny.tiny_patcher(arch, seed=0, **bench_config(arch, hidden, blocks))
        pos, neg, latent = _inputs(arch, size, hidden, txt_tokens)

        def sample(m: Any) -> Any:
            return nodes.common_ksampler(m, 3, steps, 3.0, "euler", "simple", pos, neg, latent)[0]["samples"]

        mesh, = MeshConnect().connect("")
        remote_blocks = blocks // 2
        split, = MeshSplitModel().split(model, mesh, n_blocks_remote=remote_blocks, codec_mode="raw", unique_id="bench")
        try:
            ref, out = sample(model), sample(split)  # warm-up (stages, caches)
            remote = remote_of(split)
            calls_before = sum(s["calls"] for s in remote.group.info())
            local_ms, split_ms, peaks = [], [], {"unsplit": [], "split": []}
            for _ in range(repeats):  # interleaved: both see the same machine state
                for name, m, acc in (("unsplit", model, local_ms), ("split", split, split_ms)):
                    with PeakRSS() as rss:
                        t0 = time.perf_counter()
                        sample(m)
                        acc.append((time.perf_counter() - t0) * 1000 / steps)
                    peaks[name].append(rss.above)
            calls = (sum(s["calls"] for s in remote.group.info()) - calls_before) / (repeats * steps)
            hop_bytes = sum(h.wire_bytes for h in remote.last_hops)
            loaded_split, size_split, size_unsplit = split.loaded_size(), split.model_size(), model.model_size()
        finally:
            close_all_splits()
            mm.unload_all_models()
    step_local, step_split = statistics.median(local_ms), statistics.median(split_ms)
    return {"arch": arch, "hidden": hidden, "blocks": blocks, "n_blocks_remote": remote_blocks, "steps": steps,
            "repeats": repeats, "codec": "raw", "stages": 1, "cfg_batch": 2,
            "step_ms_unsplit": round(step_local, 2), "step_ms_split": round(step_split, 2),
            "ratio_split_over_unsplit": round(step_split / step_local, 4),
            "bytes_per_step": int(hop_bytes * calls), "stage_calls_per_step": calls,
            "local_param_bytes_unsplit": size_unsplit, "local_param_bytes_split": size_split,
            "loaded_bytes_split": loaded_split, "local_bytes_fraction": round(size_split / size_unsplit, 4),
            "peak_rss_above_start_unsplit": max(peaks["unsplit"]), "peak_rss_above_start_split": max(peaks["split"]),
            "max_abs_diff": tiny.max_diff(out, ref)}


__all__ = ["ARCHS", "PeakRSS", "bench_config", "run_comfy_bench"]
