"""``mesh-ray bench comfy``: the real ComfyUI KSampler, unsplit vs MeshSplitFlux (raw), side by side.

Per-step time of ``nodes.common_ksampler`` on the same ComfyUI FLUX.1 model, unsplit and with the
back blocks on one stage actor in another process of this machine, and the parameter bytes
ComfyUI's model management loads in this process before and after the split.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bench_params(hidden: int = 512, depth: int = 2, single: int = 4) -> dict:
    """A FLUX.1 narrower than the released one (3072), with FLUX.1's head size (128) and RoPE split."""
    heads = max(1, hidden // 128)
    head = hidden // heads
    return dict(in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768, context_in_dim=hidden,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single,
                axes_dim=[head // 8, 7 * head // 16, 7 * head // 16], theta=10000, qkv_bias=True,
                guidance_embed=True)


def run_comfy_bench(comfy_path: str | None = None, hidden: int = 512, depth: int = 2, single: int = 4,
                    n_blocks_remote: int = 3, size: int = 64, txt_tokens: int = 64, steps: int = 3,
                    repeats: int = 3) -> dict:
    """Median per-step ms of ComfyUI's KSampler unsplit vs split (raw), local bytes before/after."""
    from mesh_ray.errors import ConfigError

    path = comfy_path or os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy" / "model_patcher.py").is_file():
        raise ConfigError(f"no ComfyUI source tree at {path!r}: pass --comfyui-path or set COMFYUI_PATH")
    with tempfile.TemporaryDirectory(prefix="mesh-ray-bench-comfy-") as tmp:
        os.environ.setdefault("MESH_RAY_CACHE_DIR", str(Path(tmp) / "cache" / "shards"))
        from comfy_integration.standalone import boot, flux_patcher

        stubs = Path(path).resolve().parent / "comfyui-stubs"
        boot(path, tmp, stubs if stubs.is_dir() else None, cpu=not torch.cuda.is_available())
        import comfy.model_management as mm
        import nodes

        from comfy_integration.nodes_mesh import MeshConnect, MeshSplitFlux

        params = bench_params(hidden, depth, single)
        model = flux_patcher(params, seed=0)
        g = torch.Generator().manual_seed(1)
        pos = [[torch.randn(1, txt_tokens, hidden, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                                  "guidance": 3.5}]]
        neg = [[torch.randn(1, txt_tokens, hidden, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
        latent = {"samples": torch.zeros(1, 16, size, size)}  # a latent of size x size: (size/2)^2 tokens

        def sample(m):
            return nodes.common_ksampler(m, 3, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]

        mesh, = MeshConnect().connect("")
        split, = MeshSplitFlux().split(model, mesh, n_blocks_remote=n_blocks_remote, codec_mode="raw",
                                       unique_id="bench")
        try:
            ref, out = sample(model), sample(split)  # warm-up (and shard, stages, caches)
            bytes_before = model.model_size()
            local_ms, split_ms = [], []
            for _ in range(repeats):  # interleaved: both see the same machine state
                for m, acc in ((model, local_ms), (split, split_ms)):
                    t0 = time.perf_counter()
                    sample(m)
                    acc.append((time.perf_counter() - t0) * 1000 / steps)
            sample(split)
            loaded_after = split.loaded_size()
            bytes_after = split.model_size()
        finally:
            from comfy_integration.nodes_mesh import close_all_splits

            close_all_splits()
            mm.unload_all_models()
    step_local, step_split = statistics.median(local_ms), statistics.median(split_ms)
    return {"hidden": hidden, "blocks": depth + single, "n_blocks_remote": n_blocks_remote,
            "image_tokens": (size // 2) ** 2, "txt_tokens": txt_tokens, "steps": steps, "repeats": repeats,
            "cfg_batch": 1, "codec": "raw", "step_ms_unsplit": round(step_local, 2), "step_ms_split": round(step_split, 2),
            "ratio_split_over_unsplit": round(step_split / step_local, 4),
            "local_param_bytes_unsplit": bytes_before, "local_param_bytes_split": bytes_after,
            "loaded_bytes_split": loaded_after, "local_bytes_fraction": round(bytes_after / bytes_before, 4),
            "max_abs_diff": float((out - ref).abs().max())}
