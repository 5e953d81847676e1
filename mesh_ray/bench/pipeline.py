"""``mesh-ray bench pipeline``: images/s of one process against K stages with M images in flight, side by side.

On a CPU machine every stage and the single process get ``threads`` torch threads each (a "device"
each); the caller also runs with that many.  Reports the throughput ratio per M, the bubble
fraction (idle share of the stages while images were in flight), the planner's prediction against
the measured rate and its plan against the hand plans of K=2, and with one stage made 2x slower
(it gets half the threads of the others) the planner's plan against the even split, on a deeper
model of the same width (``SLOW_MODEL``) so that block granularity does not cap the gain, with the
ceiling of that gain and the slow/fast speed ratio alone (probe) and while pipelined (busy time).
Every measurement prints a line on stderr as it finishes.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mesh_ray.bench import goals
from mesh_ray.tables import text_table
from mesh_ray.bench.progress import BenchProgress
from mesh_ray.bench.split import bench_config
from mesh_ray.errors import ConfigError
from mesh_ray.mesh import connect
from mesh_ray.models.blocks import split_evenly
from mesh_ray.models.checkpoint import load_blocks, write_random_checkpoint
from mesh_ray.models.flux import build
from mesh_ray.split.pipeline import ImageRequest, generate_many
from mesh_ray.split.plan import Plan
from mesh_ray.split.planner import auto_plan, plan_for
from mesh_ray.split.sampler import generate, random_conditioning


# The slow-stage section's blocks: fine enough for a 2:1 cut.  With exactly 2:1 devices the best cut beats
# the even split by at most 1.5x on equal blocks; 4 blocks cap it at 1.33x, these 12 at about 1.4x (a double
# block costs about 1.7 single ones: the even split already puts it on the fast stage).
SLOW_MODEL = {"depth": 1, "single": 11}
SLOW_MAX_SIZE = 512  # px: 12 blocks at 512 px cost about what 4 blocks do at 768 px, so the run stays minutes


def images_for(m: int) -> int:
    """Images per measurement at M in flight: enough that filling and draining the pipeline (about one
    stage call each) stay a small share, few enough for a run of minutes: 2M up to M=4, then M+4."""
    return max(2, min(2 * m, m + 4))


def _requests(cfg, n: int, size: int, steps: int, txt_tokens: int) -> list[ImageRequest]:
    out = []
    for i in range(n):
        txt, y = random_conditioning(cfg, batch=1, txt_len=txt_tokens, seed=i)
        out.append(ImageRequest(txt=txt, y=y, width=size, height=size, steps=steps, seed=i))
    return out


def _stage_use(split) -> list[tuple[float, int]]:
    """(busy seconds, calls) of each remote stage so far, in stage order."""
    return [(i["busy_s"], i["calls"]) for i in split.stage_info() if i.get("kind") == "stage"]


def _warm(split, req: ImageRequest) -> None:
    """One single-step image through a new split: its stages load caches before anything is timed."""
    generate_many(split, [req.model_copy(update={"steps": 1})], max_in_flight=1, progress=False)


def _measure(split, reqs: list[ImageRequest], in_flight: int) -> dict:
    """images/s and bubble fraction of one generate_many run."""
    use0 = _stage_use(split)
    res = generate_many(split, reqs, max_in_flight=in_flight, progress=False)
    use = [(b - b0, c - c0) for (b, c), (b0, c0) in zip(_stage_use(split), use0)]
    busy = sum(b for b, _ in use)
    return {"images_per_s": res.images_per_s, "wall_s": res.wall_s,
            "bubble_fraction": max(0.0, 1.0 - busy / (len(use) * res.wall_s)), "order": res.order, "stage_use": use}


def _single(local, reqs: list[ImageRequest]) -> float:
    """images/s of one process sampling ``reqs`` one after the other."""
    t0 = time.perf_counter()
    for r in reqs:
        generate(local, r.txt, r.y, width=r.width, height=r.height, steps=r.steps, seed=r.seed, progress=False)
    return len(reqs) / (time.perf_counter() - t0)


def _hand_plans(cfg, per_stage: list[int], all_cuts: bool) -> dict[str, list[tuple[int, int, int]]]:
    """Hand plans by name ("0-1 | 2-3") as (start, stop, threads) per stage: the even split, and with
    ``all_cuts`` every cut of two stages."""
    n, k = cfg.num_blocks, len(per_stage)
    plans = [[(r.start, r.stop) for r in split_evenly(cfg.depth, cfg.depth_single_blocks, k)]]
    if all_cuts and k == 2:
        plans = [[(0, c), (c, n)] for c in range(1, n)]
    return {" | ".join(f"{a}-{b - 1}" for a, b in ranges): [(a, b, t) for (a, b), t in zip(ranges, per_stage)]
            for ranges in plans}


def _plan_key(plan: Plan) -> list[tuple]:
    return [(s.start, s.stop, s.stage.get("torch_threads")) for s in plan.stages]


def _block_ms(dev, cfg) -> list[float]:
    """A probed device's ms per block of ``cfg``, from its double and single block times."""
    return [dev.double_ms] * cfg.depth + [dev.single_ms] * cfg.depth_single_blocks


def _cut_ceiling(cfg, times: list[list[float]], even: list[tuple[int, int, int]]) -> float:
    """Slowest stage of the even split over that of the best contiguous cut (any device order), both from
    the per-block times of each stage's device (``times[s]`` for stage s); hops and the front left out."""
    best = plan_for(times, 0.0, None, cfg, steps=1, front="caller").bottleneck_ms
    return max(math.fsum(times[s][a:b]) for s, (a, b, _) in enumerate(even)) / best


def _speed_figures(plan: Plan, cfg, even: list[tuple[int, int, int]], even_use: list[tuple[float, int]]) -> dict:
    """How much faster the planner's best cut could be than the even split (from block counts, and from
    the probe's per-block times with exactly 2:1 devices and with the probed ones), and the speed ratio of the slow to the fast
    device alone (probe) against while both ran the even split (busy ms per call over the fast device's
    probed ms of the stage's blocks, slow stage over the mean of the others)."""
    by_threads = {d.stage.get("torch_threads"): _block_ms(d, cfg) for d in plan.devices}
    threads = [t for _, _, t in even]
    fast_t, slow_t = max(threads), min(threads)
    fast = by_threads[fast_t]
    exact = _cut_ceiling(cfg, [fast if t == fast_t else [2 * x for x in fast] for t in threads], even)
    probed = _cut_ceiling(cfg, [by_threads[t] for t in threads], even)
    counts = _cut_ceiling(cfg, [[1.0 if t == fast_t else 2.0] * cfg.num_blocks for t in threads], even)
    per_unit = [busy * 1000 / max(calls, 1) / math.fsum(fast[a:b]) for (busy, calls), (a, b, _) in zip(even_use, even)]
    slow_units = [u for u, t in zip(per_unit, threads) if t == slow_t]
    fast_units = [u for u, t in zip(per_unit, threads) if t != slow_t]
    alone = [math.fsum(by_threads[t][a:b]) for a, b, t in even]
    return {"cut_ceiling_equal_blocks": round(counts, 3), "cut_ceiling_2to1": round(exact, 3),
            "cut_ceiling_probed": round(probed, 3),
            "probe_block_ms": {str(d.stage.get("torch_threads")): [round(d.double_ms, 2), round(d.single_ms, 2)]
                               for d in plan.devices},
            "probe_speed_ratio": round(math.fsum(by_threads[slow_t]) / math.fsum(fast), 3),
            "pipelined_speed_ratio": round(statistics.mean(slow_units) / statistics.mean(fast_units), 3),
            "even_stage_ms_per_call": [round(b * 1000 / max(c, 1), 2) for b, c in even_use],
            "even_stage_ms_alone": [round(a, 2) for a in alone]}


def _plan_section(mesh, ckpt: str, cfg, per_stage: list[int], reqs_for, size: int, steps: int, txt_tokens: int,
                  rounds: int, all_cuts: bool, prog: BenchProgress, label: str, speeds: bool = False) -> dict:
    """The planner's plan (measured by ``auto_plan``) against hand plans, in interleaved rounds; a hand
    plan identical to the planner's (same ranges, same threads, front in the caller) is measured once.
    ``speeds``: also ``_speed_figures`` (the section with one slow stage)."""
    k = len(per_stage)
    prog.start(f"{label}: planner measures {k} candidates (threads {per_stage})")
    plan = auto_plan(ckpt, k, per_stage, width=size, height=size, txt_tokens=txt_tokens, steps=steps, repeats=2)
    prog.done(f"plan {[s.blocks for s in plan.stages]}, front {plan.front}, predicted "
              f"{plan.predicted_images_per_s:.4f} images/s, bottleneck {plan.bottleneck}")
    m = plan.in_flight
    reqs = reqs_for(m)
    hands = _hand_plans(cfg, per_stage, all_cuts)
    same = next((name for name, key in hands.items() if plan.front == "caller" and key == _plan_key(plan)), None)
    prog.grow(rounds * (len(hands) + (same is None)))
    runs = {} if same else {"planner": mesh.split(ckpt, plan=plan)}
    try:
        for name, key in hands.items():
            runs[name] = mesh.split(ckpt, stages=[{"blocks": f"{a}-{b - 1}", "torch_threads": t} for a, b, t in key])
        for s in runs.values():
            _warm(s, reqs[0])
        rates: dict[str, list[float]] = {k: [] for k in runs}
        uses: dict[str, list[tuple[float, int]]] = {}
        for r in range(rounds):  # interleaved, so that every plan sees the same machine load
            for name, s in runs.items():
                shown = f"{name} (= planner)" if name == same else name
                prog.start(f"{label}: {shown}, M={m}, {len(reqs)} images" + (f", round {r + 1}" if rounds > 1 else ""))
                got = _measure(s, reqs, m)
                rates[name].append(got["images_per_s"])
                uses[name] = [(b + b0, c + c0) for (b, c), (b0, c0) in zip(got["stage_use"], uses.get(name, [(0.0, 0)] * len(got["stage_use"])))]
                prog.done(f"{rates[name][-1]:.4f} images/s")
    finally:
        for s in runs.values():
            s.close()
    measured = statistics.median(rates["planner" if same is None else same])
    hand = [{"blocks": k, "images_per_s": round(statistics.median(v), 4)} for k, v in rates.items() if k != "planner"]
    best_hand = max(h["images_per_s"] for h in hand)
    even = next(iter(_hand_plans(cfg, per_stage, False)))
    even_rate = next(h["images_per_s"] for h in hand if h["blocks"] == even)
    return {"plan": [s.blocks for s in plan.stages], "plan_front": plan.front, "plan_in_flight": m,
            "plan_bottleneck": plan.bottleneck, "plan_same_as_hand_plan": same,
            "planner_predicted_images_per_s": round(plan.predicted_images_per_s, 4),
            "planner_measured_images_per_s": round(measured, 4),
            "planner_predicted_over_measured": round(plan.predicted_images_per_s / measured, 3),
            "hand_plans": hand, "stage_threads": per_stage, "even_split": even,
            "planner_over_best_hand": round(measured / best_hand, 3),
            "planner_over_even_split": round(measured / even_rate, 3),
            **(_speed_figures(plan, cfg, hands[even], uses[even]) if speeds else {})}


def run_pipeline_bench(quick: bool = False, stages: int = 2, in_flight: tuple[int, ...] = (1, 2, 4, 8),
                       steps: int | None = None, size: int | None = None, txt_tokens: int | None = None,
                       threads: int = 1, images: int | None = None, hand_plans: bool = True,
                       rounds: int | None = None, stage_threads: tuple[int, ...] | None = None,
                       slow_stage: bool = True, progress: bool = True) -> dict:
    """Side by side: one process vs ``stages`` stages at each M in ``in_flight`` (each row next to its
    own single-process run); the planner's plan against the hand plans of two stages (``hand_plans``:
    every cut, else the even split), interleaved ``rounds`` times, with ``stage_threads`` per stage
    (default ``threads`` each); with ``slow_stage`` also the planner against the even split when the
    last stage has ``threads`` and the others twice that (one stage 2x slower), on ``SLOW_MODEL`` at up to
    ``SLOW_MAX_SIZE`` px.
    Default: 768 px, 256 text tokens, 4 steps (FLUX.1-schnell's count; fewer leave the pipeline's fill
    and drain a large share), 1 round (a few minutes on two cores)."""
    cfg = bench_config()
    size = size or (256 if quick else 768)
    steps = steps or (2 if quick else 4)
    txt_tokens = txt_tokens or (64 if quick else 256)
    rounds = rounds or 1
    equal = list(stage_threads or [threads] * stages)
    slow = [2 * threads] * (stages - 1) + [threads]
    if len(equal) != stages:
        raise ConfigError(f"{len(equal)} stage thread counts for {stages} stages: give one per stage")
    torch.set_num_threads(threads)
    t_start = time.perf_counter()

    def reqs_for(m: int) -> list[ImageRequest]:
        return _requests(cfg, images or images_for(m), size, steps, txt_tokens)

    rows, singles = [], []
    with BenchProgress(2 * len(in_flight), progress, "bench pipeline") as prog, \
            tempfile.TemporaryDirectory(prefix="mesh-ray-bench-") as tmp:
        ckpt = str(write_random_checkpoint(Path(tmp) / "bench.safetensors", cfg, seed=0))
        mesh = connect(num_cpus=4 * stages + 4)  # logical CPUs: several splits stay alive side by side
        try:
            local = build(cfg, "meta")
            local.load_state_dict(load_blocks(ckpt, ["all"], non_block=True), assign=True)
            single_reqs = _requests(cfg, images or 2, size, steps, txt_tokens)
            generate(local, single_reqs[0].txt, single_reqs[0].y, width=size, height=size, steps=1, progress=False)
            split = mesh.split(ckpt, stages=stages, torch_threads=threads)
            try:
                _warm(split, single_reqs[0])
                for m in in_flight:
                    prog.start(f"one process, {len(single_reqs)} images (next to M={m})")
                    single = _single(local, single_reqs)  # measured next to the row, under the same load
                    singles.append(single)
                    prog.done(f"{single:.4f} images/s")
                    reqs = reqs_for(m)
                    prog.start(f"K={stages} M={m}, {len(reqs)} images")
                    got = _measure(split, reqs, m)
                    rows.append({"stages": stages, "in_flight": m, "images": len(reqs),
                                 "images_per_s": round(got["images_per_s"], 4), "single_images_per_s": round(single, 4),
                                 "throughput_ratio": round(got["images_per_s"] / single, 3),
                                 "bubble_fraction": round(got["bubble_fraction"], 3)})
                    prog.done(f"{got['images_per_s']:.4f} images/s, ratio {rows[-1]['throughput_ratio']:.3f}, "
                              f"bubble {rows[-1]['bubble_fraction']:.3f}")
            finally:
                split.close()
            prog.grow(1)
            planner = _plan_section(mesh, ckpt, cfg, equal, reqs_for, size, steps, txt_tokens, rounds, hand_plans,
                                    prog, "planner")
            slowed = None
            if slow_stage and stages >= 2:
                prog.grow(1)
                deep, slow_size = bench_config(**SLOW_MODEL), min(size, SLOW_MAX_SIZE)
                deep_ckpt = str(write_random_checkpoint(Path(tmp) / "bench-deep.safetensors", deep, seed=0))
                slowed = _plan_section(mesh, deep_ckpt, deep, slow,
                                       lambda m: _requests(deep, images or images_for(m), slow_size, steps, txt_tokens),
                                       slow_size, steps, txt_tokens, rounds, False, prog, "one stage 2x slower", speeds=True)
                slowed.update({"model": {"hidden": deep.hidden_size, "depth": deep.depth,
                                         "single": deep.depth_single_blocks, "blocks": deep.num_blocks},
                               "size": slow_size, "image_tokens": (slow_size // 16) ** 2})
        finally:
            mesh.close()
    by_m = {str(r["in_flight"]): r for r in rows}
    return {"model": {"hidden": cfg.hidden_size, "blocks": cfg.num_blocks}, "size": size,
            "image_tokens": (size // 16) ** 2, "txt_tokens": txt_tokens, "steps": steps, "threads_per_device": threads,
            "single_images_per_s": round(statistics.median(singles), 4), "rows": rows,
            "throughput_ratio": {k: r["throughput_ratio"] for k, r in by_m.items()},
            "bubble_fraction": {k: r["bubble_fraction"] for k, r in by_m.items()},
            **planner, "rounds": rounds, "slow_stage": slowed,
            "slow_planner_over_even_split": slowed["planner_over_even_split"] if slowed else None,
            "goals": goals.PIPELINE, "wall_s": round(time.perf_counter() - t_start, 1)}


def _plan_lines(sec: dict, rounds: int, title: str) -> list[str]:
    lines = [f"{title} (stage threads {sec['stage_threads']}): plan {sec['plan']}, front {sec['plan_front']}, "
             f"M={sec['plan_in_flight']}: predicted {sec['planner_predicted_images_per_s']:.4f}, measured "
             f"{sec['planner_measured_images_per_s']:.4f} images/s (bottleneck {sec['plan_bottleneck']})"]
    for h in sec["hand_plans"]:
        same = " (the planner's plan)" if h["blocks"] == sec["plan_same_as_hand_plan"] else ""
        lines.append(f"  hand plan {h['blocks']}: {h['images_per_s']:.4f} images/s{same} (median of {rounds} rounds)")
    lines.append(f"  planner / best hand plan: {sec['planner_over_best_hand']:.3f}; planner / even split "
                 f"({sec['even_split']}): {sec['planner_over_even_split']:.3f}")
    return lines


def format_table(result: dict) -> str:
    """The side-by-side table for people, and each goal met or not."""
    g = result["goals"]
    lines = [f"one process ({result['threads_per_device']} thread): {result['single_images_per_s']:.4f} images/s "
             f"({result['size']}px, {result['steps']} steps, {result['model']['blocks']} blocks of {result['model']['hidden']})",
             text_table(["stages", "in flight", "images", "images/s", "single", "ratio", "bubble"],
                        [[r["stages"], r["in_flight"], r["images"], f"{r['images_per_s']:.4f}",
                          f"{r['single_images_per_s']:.4f}", f"{r['throughput_ratio']:.3f}",
                          f"{r['bubble_fraction']:.3f}"] for r in result["rows"]])]
    lines += _plan_lines(result, result["rounds"], "planner")
    if result["slow_stage"]:
        sl = result["slow_stage"]
        lines += _plan_lines(sl, result["rounds"], f"one stage 2x slower ({sl['model']['depth']} double + "
                             f"{sl['model']['single']} single blocks, {sl['size']}px)")
        lines.append(f"  best cut / even split at most (hops and front left out): {sl['cut_ceiling_equal_blocks']:.3f} "
                     f"for equal blocks on exactly 2:1 devices, {sl['cut_ceiling_2to1']:.3f} with the probe's block "
                     f"times on exactly 2:1 devices, {sl['cut_ceiling_probed']:.3f} with the probed devices "
                     f"(ms per double, single block by threads: {sl['probe_block_ms']})")
        lines.append(f"  slow / fast device time per block: {sl['probe_speed_ratio']:.3f} alone (probe), "
                     f"{sl['pipelined_speed_ratio']:.3f} while pipelined (even split, busy ms per call "
                     f"{sl['even_stage_ms_per_call']} vs alone {sl['even_stage_ms_alone']})")
    big = [r["throughput_ratio"] for r in result["rows"] if r["stages"] == 2 and r["in_flight"] >= 4]

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    lines.append(f"goals: K=2, M>=4 ratio >= {g['throughput_ratio_k2_m4']}: "
                 f"{verdict(min(big) >= g['throughput_ratio_k2_m4'] if big else None)}; planner / best hand plan >= "
                 f"{g['planner_over_best_hand']}: {verdict(result['planner_over_best_hand'] >= g['planner_over_best_hand'])}; "
                 f"one stage 2x slower, planner / even split >= {g['slow_planner_over_even_split']}: "
                 f"{verdict(None if result['slow_planner_over_even_split'] is None else result['slow_planner_over_even_split'] >= g['slow_planner_over_even_split'])}")
    lines.append(f"run took {result['wall_s']:.0f} s")
    return "\n".join(lines)
