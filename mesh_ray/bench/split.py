"""``mesh-ray bench split``: per-step time of the split forward against the local forward, side by side,
for each asked transport (``--transport object,gloo,auto``).

Each transport gets its own split, measured interleaved with the local forward so that both see
the same machine state; its ratio, its largest difference from the local result and what each hop
used (transport, bytes, ms) are reported.  The top-level ``ratio_split_over_local`` and
``max_abs_diff`` are the first transport's and the largest of all.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from mesh_ray.bench import median_ms
from mesh_ray.mesh import connect
from mesh_ray.models.checkpoint import load_blocks, save_checkpoint, write_random_checkpoint
from mesh_ray.models.flux import FluxConfig, build, default_axes_dim, position_ids, random_state_dict
from mesh_ray.split.links import TRANSPORTS
from mesh_ray.errors import ConfigError
from mesh_ray.tables import text_table


def bench_config(arch: str = "flux1", hidden: int = 512, heads: int = 4, depth: int = 1, single: int = 3) -> FluxConfig:
    """A FLUX-architecture config narrow enough for the machine (the real models are 3072+ wide)."""
    head_dim = hidden // heads
    return FluxConfig(arch=arch, in_channels=64 if arch == "flux1" else 128, context_in_dim=hidden,
                      vec_in_dim=hidden // 4 if arch == "flux1" else None, hidden_size=hidden, num_heads=heads,
                      mlp_ratio=4.0 if arch == "flux1" else 3.0, depth=depth, depth_single_blocks=single,
                      axes_dim=default_axes_dim(arch, head_dim), theta=10000 if arch == "flux1" else 2000,
                      qkv_bias=arch == "flux1", guidance_embed=arch == "flux1")


def parse_transports(text: str) -> tuple[str, ...]:
    """``object,gloo,auto`` as a tuple; an unknown name is one line naming the choices."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in TRANSPORTS]
    if bad or not names:
        raise ConfigError(f"--transport {text!r}: use a comma-separated list of {', '.join(TRANSPORTS)}")
    return names


def run_split_bench(arch: str = "flux1", hidden: int = 512, heads: int = 4, depth: int = 1, single: int = 3,
                    image_tokens: int = 4096, txt_tokens: int = 512, stages: int = 2, repeats: int = 3,
                    transports: tuple[str, ...] = ("auto",), num_gpus: float | None = None) -> dict:
    """Median step ms, local vs split in raw mode for each transport, at the FLUX 1024x1024 token count
    by default.  On a machine with CUDA the caller and the stages compute in bf16 on the GPU
    (``num_gpus`` per stage: 0.5 puts two stages on one GPU)."""
    cfg = bench_config(arch, hidden, heads, depth, single)
    cuda = torch.cuda.is_available()
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    side = int(image_tokens**0.5)
    h_tok, w_tok = side, image_tokens // side
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(1, h_tok * w_tok, cfg.in_channels, generator=gen).to(dev, dtype)
    txt = torch.randn(1, txt_tokens, cfg.context_in_dim, generator=gen).to(dev, dtype)
    img_ids, txt_ids = position_ids(cfg.arch, 1, h_tok, w_tok, txt_tokens, device=dev)
    t = torch.tensor([0.5], device=dev)
    y = torch.randn(1, cfg.vec_in_dim, generator=gen).to(dev, dtype) if cfg.vec_in_dim else None
    g = torch.tensor([3.5], device=dev) if cfg.guidance_embed else None
    args = (img, img_ids, txt, txt_ids, t, y, g)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mesh-ray-bench-") as tmp:
        ckpt = _checkpoint(Path(tmp) / "bench.safetensors", cfg, dev, dtype)
        mesh = connect(num_cpus=max(stages + 1, 2), num_gpus=1 if cuda else None)
        local = build(cfg, "meta")
        local.load_state_dict(load_blocks(ckpt, ["all"], non_block=True), assign=True)
        local = local.to(dev, dtype)

        def local_step() -> torch.Tensor:
            with torch.inference_mode():
                out = local(*args)
            sync()
            return out

        ref = local_step()
        for transport in transports:
            rows[transport] = _measure(mesh, str(ckpt), cfg, stages, num_gpus, transport, args, ref, local_step, repeats)
    first = rows[transports[0]]
    return {"arch": arch, "hidden": hidden, "blocks": depth + single, "image_tokens": h_tok * w_tok,
            "txt_tokens": txt_tokens, "stages": stages, "codec": "raw", "device": str(dev), "dtype": str(dtype)[6:],
            "repeats": repeats, "transports": list(transports),
            **{k: first[k] for k in ("step_ms_local", "step_ms_split", "ratio_split_over_local", "hop_ms",
                                     "hops_per_step", "bytes_per_step", "hops")},
            "max_abs_diff": max(r["max_abs_diff"] for r in rows.values()), "by_transport": rows}


def _checkpoint(path: Path, cfg: FluxConfig, dev: torch.device, dtype: torch.dtype) -> Path:
    """Seeded random weights in the compute dtype, made on ``dev`` (quick at full width on a GPU)."""
    if dev.type == "cpu":
        return write_random_checkpoint(path, cfg, seed=0)
    sd = random_state_dict(cfg, seed=0, dtype=dtype, device=dev)
    return save_checkpoint({k: v.cpu() for k, v in sd.items()}, path, cfg)


def _measure(mesh: Any, ckpt: str, cfg: FluxConfig, stages: int, num_gpus: float | None, transport: str,
             args: tuple, ref: torch.Tensor, local_step: Callable[[], torch.Tensor], repeats: int) -> dict:
    """One transport: its split measured interleaved with the local forward."""
    from mesh_ray.models.blocks import split_evenly

    specs = [{"blocks": f"{r.start}-{r.stop - 1}", **({"num_gpus": num_gpus} if num_gpus is not None else {})}
             for r in split_evenly(cfg.depth, cfg.depth_single_blocks, stages)]
    opts = {"mesh_generation": "bench"}
    with mesh.split(ckpt, stages=specs, codec="raw", transport=transport) as split:
        out = split(*args, transformer_options=opts)  # warm-up, caches pe
        max_abs = float((out.float() - ref.float()).abs().max())
        local_ms, split_ms, hops = [], [], []
        for _ in range(repeats):  # interleaved, so that both see the same machine state
            local_ms.append(median_ms(local_step, 1))
            split_ms.append(median_ms(lambda: split(*args, transformer_options=opts), 1))
            hops.append(split.last.transfers)
        links = split.links
    step_local, step_split = statistics.median(local_ms), statistics.median(split_ms)
    per_hop = [{"link": h.link, "transport": h.transport, "bytes": h.wire_bytes,
                "transfer_ms": round(statistics.median(r[i].transfer_ms or 0.0 for r in hops), 3)}
               for i, h in enumerate(hops[-1])]
    between = [h["transfer_ms"] for h in per_hop if "caller" not in h["link"]]
    return {"step_ms_local": round(step_local, 2), "step_ms_split": round(step_split, 2),
            "ratio_split_over_local": round(step_split / step_local, 4), "max_abs_diff": max_abs,
            "hop_ms": round(statistics.median(between or [h["transfer_ms"] for h in per_hop]), 3),
            "hops_per_step": len(per_hop), "bytes_per_step": sum(h["bytes"] for h in per_hop), "hops": per_hop,
            "links": links}


def format_table(result: dict) -> str:
    """One row per transport: step ms local / split, ratio, max abs diff, and each hop's transport and ms."""
    rows = [[t, r["step_ms_local"], r["step_ms_split"], r["ratio_split_over_local"], r["max_abs_diff"],
             " ".join(f"{h['link']}:{h['transport']}:{h['transfer_ms']:g}ms" for h in r["hops"])]
            for t, r in result["by_transport"].items()]
    head = (f"mesh-ray bench split: {result['stages']} stages, {result['image_tokens']}+{result['txt_tokens']} tokens, "
            f"width {result['hidden']}, {result['device']} {result['dtype']}, raw links")
    return head + "\n" + text_table(["transport", "local ms", "split ms", "split/local", "max abs diff", "hops"], rows)


__all__ = ["bench_config", "format_table", "parse_transports", "run_split_bench"]
