"""``mesh-ray bench split``: per-step time of the split forward against the local forward, side by side."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import ray
import torch

from mesh_ray.bench import median_ms
from mesh_ray.mesh import connect
from mesh_ray.models.checkpoint import load_blocks, write_random_checkpoint
from mesh_ray.models.flux import BlockState, FluxConfig, build, default_axes_dim, position_ids


def bench_config(arch: str = "flux1", hidden: int = 512, heads: int = 4, depth: int = 1, single: int = 3) -> FluxConfig:
    """A FLUX-architecture config narrow enough for the machine (the real models are 3072+ wide)."""
    head_dim = hidden // heads
    return FluxConfig(arch=arch, in_channels=64 if arch == "flux1" else 128, context_in_dim=hidden,
                      vec_in_dim=hidden // 4 if arch == "flux1" else None, hidden_size=hidden, num_heads=heads,
                      mlp_ratio=4.0 if arch == "flux1" else 3.0, depth=depth, depth_single_blocks=single,
                      axes_dim=default_axes_dim(arch, head_dim), theta=10000 if arch == "flux1" else 2000,
                      qkv_bias=arch == "flux1", guidance_embed=arch == "flux1")


def run_split_bench(arch: str = "flux1", hidden: int = 512, heads: int = 4, depth: int = 1, single: int = 3,
                    image_tokens: int = 4096, txt_tokens: int = 512, stages: int = 2, repeats: int = 3) -> dict:
    """Median step ms, local vs split in raw mode, at the FLUX 1024x1024 token count by default."""
    cfg = bench_config(arch, hidden, heads, depth, single)
    side = int(image_tokens**0.5)
    h_tok, w_tok = side, image_tokens // side
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(1, h_tok * w_tok, cfg.in_channels, generator=gen)
    txt = torch.randn(1, txt_tokens, cfg.context_in_dim, generator=gen)
    img_ids, txt_ids = position_ids(cfg.arch, 1, h_tok, w_tok, txt_tokens)
    t = torch.tensor([0.5])
    y = torch.randn(1, cfg.vec_in_dim, generator=gen) if cfg.vec_in_dim else None
    g = torch.tensor([3.5]) if cfg.guidance_embed else None
    with tempfile.TemporaryDirectory(prefix="mesh-ray-bench-") as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "bench.safetensors", cfg, seed=0)
        mesh = connect(num_cpus=max(stages + 1, 2))
        local = build(cfg, "meta")
        local.load_state_dict(load_blocks(ckpt, ["all"], non_block=True), assign=True)
        split = mesh.split(str(ckpt), stages=stages)
        try:
            opts = {"mesh_generation": "bench"}
            with torch.inference_mode():
                ref = local(img, img_ids, txt, txt_ids, t, y, g)
            out = split(img, img_ids, txt, txt_ids, t, y, g, transformer_options=opts)  # warm-up, caches pe
            max_abs = float((out - ref).abs().max())
            # Interleave local and split runs so that both see the same machine state.
            local_ms, split_ms = [], []
            for _ in range(repeats):
                with torch.inference_mode():
                    local_ms.append(median_ms(lambda: local(img, img_ids, txt, txt_ids, t, y, g), 1))
                split_ms.append(median_ms(lambda: split(img, img_ids, txt, txt_ids, t, y, g, transformer_options=opts), 1))
            bytes_per_step, hops = split.last.bytes, split.last.hops
            state = BlockState(torch.randn(1, h_tok * w_tok + txt_tokens, hidden), None, txt_tokens)
            actor = split.stages[0].actor
            ray.get(actor.echo.remote(state), timeout=120)
            hop_ms = median_ms(lambda: ray.get(actor.echo.remote(state), timeout=120), max(3, repeats)) / 2
        finally:
            split.close()
    step_local, step_split = statistics.median(local_ms), statistics.median(split_ms)
    return {"arch": arch, "hidden": hidden, "blocks": depth + single, "image_tokens": h_tok * w_tok,
            "txt_tokens": txt_tokens, "stages": stages, "codec": "raw", "repeats": repeats,
            "step_ms_local": round(step_local, 2), "step_ms_split": round(step_split, 2),
            "ratio_split_over_local": round(step_split / step_local, 4), "hop_ms": round(hop_ms, 2),
            "hops_per_step": hops, "bytes_per_step": bytes_per_step, "max_abs_diff": max_abs}
