"""``mesh-ray bench pipeline``: images/s of one process against K stages with M images in flight, side by side.

On a CPU machine every stage and the single process get ``threads`` torch threads each (a "device"
each); the caller also runs with that many.  Reports the throughput ratio per M, the bubble
fraction (idle share of the stages while images were in flight), the planner's prediction against
the measured rate, and the planner's plan against every hand plan of K=2.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from mesh_ray.bench import text_table
from mesh_ray.bench.split import bench_config
from mesh_ray.errors import ConfigError
from mesh_ray.mesh import connect
from mesh_ray.models.blocks import split_evenly
from mesh_ray.models.checkpoint import load_blocks, write_random_checkpoint
from mesh_ray.models.flux import build
from mesh_ray.pipeline import ImageRequest, generate_many
from mesh_ray.planner import auto_plan
from mesh_ray.sampler import generate, random_conditioning


def _requests(cfg, n: int, size: int, steps: int, txt_tokens: int) -> list[ImageRequest]:
    out = []
    for i in range(n):
        txt, y = random_conditioning(cfg, batch=1, txt_len=txt_tokens, seed=i)
        out.append(ImageRequest(txt=txt, y=y, width=size, height=size, steps=steps, seed=i))
    return out


def _busy(split) -> float:
    return sum(i["busy_s"] for i in split.stage_info() if i.get("kind") == "stage")


def _measure(split, reqs: list[ImageRequest], in_flight: int) -> dict:
    """images/s and bubble fraction of one generate_many run (after a one-image warm-up)."""
    generate_many(split, reqs[:1], max_in_flight=1, progress=False)
    busy0 = _busy(split)
    res = generate_many(split, reqs, max_in_flight=in_flight, progress=False)
    busy = _busy(split) - busy0
    stages = sum(1 for s in split.stages if not s.spec.local)
    return {"images_per_s": res.images_per_s, "wall_s": res.wall_s,
            "bubble_fraction": max(0.0, 1.0 - busy / (stages * res.wall_s)), "order": res.order}


def _single(local, reqs: list[ImageRequest]) -> float:
    """images/s of one process sampling ``reqs`` one after the other."""
    t0 = time.perf_counter()
    for r in reqs:
        generate(local, r.txt, r.y, width=r.width, height=r.height, steps=r.steps, seed=r.seed, progress=False)
    return len(reqs) / (time.perf_counter() - t0)


def run_pipeline_bench(quick: bool = False, stages: int = 2, in_flight: tuple[int, ...] = (1, 2, 4, 8),
                       steps: int | None = None, size: int | None = None, txt_tokens: int | None = None,
                       threads: int = 1, images: int | None = None, hand_plans: bool = True,
                       rounds: int | None = None, stage_threads: tuple[int, ...] | None = None) -> dict:
    """Side by side: one process vs ``stages`` stages at each M in ``in_flight`` (each row next to its
    own single-process run); the planner's plan against every hand plan of two stages, interleaved.
    ``stage_threads`` (one per stage, default ``threads`` each) makes the planner's devices unequal,
    e.g. (2, 1) for one stage about 2x slower than the other."""
    cfg = bench_config()
    size = size or (256 if quick else 1024)
    steps = steps or (2 if quick else 3)
    txt_tokens = txt_tokens or (64 if quick else 512)
    rounds = rounds or (1 if quick else 2)
    per_stage = list(stage_threads or [threads] * stages)
    if len(per_stage) != stages:
        raise ConfigError(f"{len(per_stage)} stage thread counts for {stages} stages: give one per stage")
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mesh-ray-bench-") as tmp:
        ckpt = str(write_random_checkpoint(Path(tmp) / "bench.safetensors", cfg, seed=0))
        mesh = connect(num_cpus=4 * stages + 4)  # logical CPUs: several splits stay alive side by side
        local = build(cfg, "meta")
        local.load_state_dict(load_blocks(ckpt, ["all"], non_block=True), assign=True)
        single_reqs = _requests(cfg, images or 4, size, steps, txt_tokens)
        generate(local, single_reqs[0].txt, single_reqs[0].y, width=size, height=size, steps=1, progress=False)
        singles = []
        split = mesh.split(ckpt, stages=stages, torch_threads=threads)
        try:
            for m in in_flight:
                single = _single(local, single_reqs)  # measured next to the row, under the same load
                singles.append(single)
                got = _measure(split, _requests(cfg, images or max(2 * m, 4), size, steps, txt_tokens), m)
                rows.append({"stages": stages, "in_flight": m, "images_per_s": round(got["images_per_s"], 4),
                             "single_images_per_s": round(single, 4),
                             "throughput_ratio": round(got["images_per_s"] / single, 3),
                             "bubble_fraction": round(got["bubble_fraction"], 3)})
        finally:
            split.close()
        plan = auto_plan(ckpt, stages, per_stage, width=size, height=size, txt_tokens=txt_tokens,
                         steps=steps, repeats=2)
        m = plan.in_flight
        reqs = _requests(cfg, images or max(2 * m, 4), size, steps, txt_tokens)
        runs = {"planner": mesh.split(ckpt, plan=plan)}
        n = cfg.num_blocks
        even = " | ".join(f"{r.start}-{r.stop - 1}" for r in split_evenly(cfg.depth, cfg.depth_single_blocks, stages))
        if hand_plans and stages == 2:
            for cut in range(1, n):
                specs = [{"blocks": f"0-{cut - 1}", "torch_threads": per_stage[0]},
                         {"blocks": f"{cut}-{n - 1}", "torch_threads": per_stage[1]}]
                runs[f"0-{cut - 1} | {cut}-{n - 1}"] = mesh.split(ckpt, stages=specs)
        rates: dict[str, list[float]] = {k: [] for k in runs}
        try:
            for _ in range(rounds):  # interleaved, so that every plan sees the same machine load
                for name, s in runs.items():
                    rates[name].append(_measure(s, reqs, m)["images_per_s"])
        finally:
            for s in runs.values():
                s.close()
        mesh.close()
    measured = statistics.median(rates.pop("planner"))
    hands = [{"blocks": k, "images_per_s": round(statistics.median(v), 4)} for k, v in rates.items()]
    best_hand = max((h["images_per_s"] for h in hands), default=None)
    even_rate = next((h["images_per_s"] for h in hands if h["blocks"] == even), None)
    return {"model": {"hidden": cfg.hidden_size, "blocks": cfg.num_blocks}, "size": size,
            "image_tokens": (size // 16) ** 2, "txt_tokens": txt_tokens, "steps": steps, "threads_per_device": threads,
            "single_images_per_s": round(statistics.median(singles), 4), "rows": rows,
            "throughput_ratio": {str(r["in_flight"]): r["throughput_ratio"] for r in rows},
            "bubble_fraction": {str(r["in_flight"]): r["bubble_fraction"] for r in rows},
            "plan": [s.blocks for s in plan.stages], "plan_in_flight": m, "plan_bottleneck": plan.bottleneck,
            "planner_predicted_images_per_s": round(plan.predicted_images_per_s, 4),
            "planner_measured_images_per_s": round(measured, 4),
            "planner_predicted_over_measured": round(plan.predicted_images_per_s / measured, 3),
            "hand_plans": hands, "rounds": rounds, "stage_threads": per_stage, "even_split": even,
            "planner_over_best_hand": round(measured / best_hand, 3) if best_hand else None,
            "planner_over_even_split": round(measured / even_rate, 3) if even_rate else None}


def format_table(result: dict) -> str:
    """The side-by-side table for people."""
    lines = [f"one process ({result['threads_per_device']} thread): {result['single_images_per_s']:.4f} images/s "
             f"({result['size']}px, {result['steps']} steps, {result['model']['blocks']} blocks of {result['model']['hidden']})",
             text_table(["stages", "in flight", "images/s", "single", "ratio", "bubble"],
                        [[r["stages"], r["in_flight"], f"{r['images_per_s']:.4f}", f"{r['single_images_per_s']:.4f}",
                          f"{r['throughput_ratio']:.3f}", f"{r['bubble_fraction']:.3f}"] for r in result["rows"]])]
    lines.append(f"planner: {result['plan']} at M={result['plan_in_flight']}: predicted "
                 f"{result['planner_predicted_images_per_s']:.4f}, measured {result['planner_measured_images_per_s']:.4f} "
                 f"images/s (bottleneck {result['plan_bottleneck']})")
    for h in result["hand_plans"]:
        lines.append(f"hand plan {h['blocks']}: {h['images_per_s']:.4f} images/s (median of {result['rounds']} rounds)")
    if result["planner_over_best_hand"] is not None:
        lines.append(f"planner / best hand plan: {result['planner_over_best_hand']:.3f}; planner / even split "
                     f"({result['even_split']}): {result['planner_over_even_split']:.3f} (stage threads {result['stage_threads']})")
    return "\n".join(lines)
