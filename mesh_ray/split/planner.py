"""Stage planner: contiguous block ranges over mismatched devices so the slowest pipeline stage is as fast as possible.

Pure arithmetic over measured (or given) costs: ``plan_for`` takes per-block times, the caller's
front time and each device's free memory and returns a ``Plan``.  When the caller is the
bottleneck the front (embedders, final layer) is tried on the first and last stages instead
(``Plan.front``, ``SplitOptions.front``) and kept there when that is predicted faster.  Measuring devices lives in
``mesh_ray.actors.profiling``; ``mesh_ray.split.planner.auto_plan`` joins the two.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Sequence

from mesh_ray.config import StageSpec
from mesh_ray.errors import ConfigError
from mesh_ray.memory import OffloadSpec
from mesh_ray.models.flux import FluxConfig
from mesh_ray.split.plan import DeviceProfile, ModelShape, Plan, PlanStage

_INF = math.inf
MAX_PERMUTED_DEVICES = 6  # device orders are searched exhaustively up to this many candidates
OFFLOAD_WINDOW: int = OffloadSpec.model_fields["window_size"].default  # blocks an offloaded stage holds


def _per_block(ms: Any, shape: ModelShape, i: int) -> list[float]:
    """A device's per-block times from a float, a (double_ms, single_ms) pair or a full list."""
    if isinstance(ms, (int, float)):
        return [float(ms)] * shape.num_blocks
    ms = list(ms)
    if len(ms) == 2 and shape.num_blocks != 2:
        return [float(ms[0])] * shape.depth + [float(ms[1])] * shape.num_single
    if len(ms) != shape.num_blocks:
        raise ConfigError(f"per_block_ms for device {i} has {len(ms)} entries but the model has {shape.num_blocks} "
                          f"blocks: give one number, a (double_ms, single_ms) pair or one number per block")
    return [float(x) for x in ms]


def plan_for(per_block_ms: Sequence[Any], front_ms: float, mem_per_device: Sequence[int | None] | None,
             shape: ModelShape | FluxConfig, *, names: Sequence[str] | None = None, link_ms: float = 0.0,
             steps: int = 20, in_flight: int | None = None, work_bytes: int | Sequence[int] = 0,
             h2d_bytes_per_s: float | Sequence[float | None] | None = None, offload_window: int = OFFLOAD_WINDOW,
             allow_offload: bool = True, stage_fields: Sequence[dict] | None = None, dtype_bytes: int = 2,
             front: str = "auto", stage_front_ms: Sequence[tuple[float, float] | None] | None = None) -> Plan:
    """Plan from given costs (e.g. GPUs measured elsewhere).

    ``per_block_ms[d]``: device d's ms per block (a number, a (double, single) pair or one per block);
    ``front_ms``: the caller's embedders + final layer per step; ``mem_per_device[d]``: free bytes
    (None = unlimited).  ``shape`` is a ``ModelShape`` or a ``FluxConfig`` (weights at ``dtype_bytes``).
    ``front``: "caller", "stage" or "auto" (the stages when the caller is the bottleneck and that is
    predicted faster); ``stage_front_ms[d]``: (embedders ms, final layer ms) on device d (default: half
    of ``front_ms`` each).
    """
    if isinstance(shape, FluxConfig):
        shape = ModelShape.from_config(shape, dtype_bytes)
    k = len(per_block_ms)
    if k == 0:
        raise ConfigError("no candidate devices given: give at least one device's per-block time")
    mems = list(mem_per_device) if mem_per_device is not None else [None] * k
    works = [work_bytes] * k if isinstance(work_bytes, int) else list(work_bytes)
    h2d = list(h2d_bytes_per_s) if isinstance(h2d_bytes_per_s, Sequence) else [h2d_bytes_per_s] * k
    fields = list(stage_fields) if stage_fields is not None else [{} for _ in range(k)]
    labels = list(names) if names is not None else [f"device {i}" for i in range(k)]
    parts = list(stage_front_ms) if stage_front_ms is not None else [None] * k
    if not len(mems) == len(works) == len(h2d) == len(fields) == len(labels) == len(parts) == k:
        raise ConfigError(f"{k} devices have per-block times but the memory / names / stage lists differ in length: "
                          f"give one entry per device")
    devices = []
    for i in range(k):
        times = _per_block(per_block_ms[i], shape, i)
        devices.append((DeviceProfile(name=labels[i], double_ms=times[0] if shape.depth else times[-1],
                                      single_ms=times[-1], free_bytes=mems[i], work_bytes=works[i],
                                      h2d_bytes_per_s=h2d[i], stage=fields[i], embed_ms=parts[i] and parts[i][0],
                                      final_ms=parts[i] and parts[i][1]), times))
    return _plan(devices, front_ms, shape, link_ms, steps, in_flight, offload_window, allow_offload, front)


def plan_profiles(devices: Sequence[DeviceProfile], front_ms: float, shape: ModelShape, *, link_ms: float = 0.0,
                  steps: int = 20, in_flight: int | None = None, offload_window: int = OFFLOAD_WINDOW,
                  allow_offload: bool = True, front: str = "auto") -> Plan:
    """Plan from measured ``DeviceProfile``s (double/single block times); ``front`` as in ``plan_for``."""
    if not devices:
        raise ConfigError("no candidate devices given: give at least one device")
    pairs = [(d, [d.double_ms] * shape.depth + [d.single_ms] * shape.num_single) for d in devices]
    return _plan(pairs, front_ms, shape, link_ms, steps, in_flight, offload_window, allow_offload, front)


def _front_parts(dev: DeviceProfile, front_ms: float) -> tuple[float, float]:
    """(embedders ms, final layer ms) on ``dev``: measured there, else half the caller's front each."""
    half = front_ms / 2
    return (half if dev.embed_ms is None else dev.embed_ms, half if dev.final_ms is None else dev.final_ms)


def _stage_cost(dev: DeviceProfile, times: list[float], shape: ModelShape, j: int, i: int, link_ms: float,
                window: int, allow_offload: bool, front: tuple[float, float] | None = None) -> tuple[float, bool, int, float]:
    """(ms per step, offloaded, bytes needed, front ms of it) for blocks j..i-1 on ``dev``; ms is inf when it
    cannot fit.  ``front`` (embed ms, final ms on ``dev``): the front runs on the stages, so the first stage
    embeds and the last runs the final layer, each holding the front's weights too."""
    runs_front = front is not None and (j == 0 or i == shape.num_blocks)
    extra = (front[0] if j == 0 else 0.0) + (front[1] if i == shape.num_blocks else 0.0) if runs_front else 0.0
    held = shape.front_bytes if runs_front else 0
    weights = sum(shape.block_bytes[j:i])
    need = weights + held + dev.work_bytes
    compute = math.fsum(times[j:i]) + link_ms + extra
    if dev.free_bytes is None or need <= dev.free_bytes:
        return compute, False, need, extra
    if allow_offload and dev.h2d_bytes_per_s:
        need = window * max(shape.block_bytes[j:i]) + held + dev.work_bytes
        if need <= dev.free_bytes:
            # Prefetch overlaps the copy of the next block with this block's compute.
            streamed = sum(max(t, b / dev.h2d_bytes_per_s * 1000) for t, b in zip(times[j:i], shape.block_bytes[j:i]))
            return streamed + link_ms + extra, True, need, extra
    return _INF, False, need, extra


def _best_ranges(order: list[tuple[DeviceProfile, list[float]]], shape: ModelShape, link_ms: float, window: int,
                 allow_offload: bool, front_ms: float | None = None) -> tuple[tuple[float, float, int], list[tuple[int, int, int]]]:
    """DP over (device, first i blocks): minimise (slowest stage, total ms, stages); a device may get no blocks.
    ``front_ms`` (the caller's) set: the front runs on the first and last stages."""
    n, k = shape.num_blocks, len(order)
    best: list[list[tuple]] = [[(_INF, _INF, 0)] * (n + 1) for _ in range(k + 1)]
    back: list[list[int]] = [[-1] * (n + 1) for _ in range(k + 1)]
    best[0][0] = (0.0, 0.0, 0)
    for d in range(1, k + 1):
        dev, times = order[d - 1]
        parts = None if front_ms is None else _front_parts(dev, front_ms)
        for i in range(n + 1):
            cand, arg = best[d - 1][i], i  # device unused
            for j in range(i):
                prev = best[d - 1][j]
                if prev[0] == _INF:
                    continue
                ms = _stage_cost(dev, times, shape, j, i, link_ms, window, allow_offload, parts)[0]
                if ms == _INF:
                    continue
                val = (max(prev[0], ms), prev[1] + ms, prev[2] + 1)
                if _better(val, cand):
                    cand, arg = val, j
            best[d][i], back[d][i] = cand, arg
    ranges, i = [], n
    for d in range(k, 0, -1):
        j = back[d][i]
        if j < i:
            ranges.append((d - 1, j, i))
        i = j
    return best[k][n], ranges[::-1]


def _better(a: tuple, b: tuple) -> bool:
    """Lexicographic with a tolerance on the times so that ties fall to total time, then fewer stages."""
    for x, y in ((a[0], b[0]), (a[1], b[1])):
        if x == y or (x != _INF and y != _INF and abs(x - y) <= 1e-9 * max(1.0, abs(y))):
            continue
        return x < y
    return a[2] < b[2]


def _orders(devices: list[tuple[DeviceProfile, list[float]]]) -> list[list[tuple[DeviceProfile, list[float]]]]:
    """Device orders worth trying: all distinct permutations for a few devices, else the given order."""
    if len(devices) > MAX_PERMUTED_DEVICES:
        return [devices]
    seen, out = set(), []
    for perm in itertools.permutations(range(len(devices))):
        sig = tuple((tuple(devices[p][1]), devices[p][0].free_bytes, devices[p][0].h2d_bytes_per_s, devices[p][0].work_bytes,
                     devices[p][0].embed_ms, devices[p][0].final_ms) for p in perm)
        if sig not in seen:
            seen.add(sig)
            out.append([devices[p] for p in perm])
    return out


def _no_fit(devices: list[tuple[DeviceProfile, list[float]]], shape: ModelShape, allow_offload: bool) -> ConfigError:
    total = sum(shape.block_bytes) / 1e9
    frees = ", ".join("unlimited" if d.free_bytes is None else f"{d.free_bytes / 1e9:.2f} GB" for d, _ in devices)
    fix = "add a device, free memory or use a smaller dtype" + ("" if allow_offload else ", or allow offload")
    streams = allow_offload and any(d.h2d_bytes_per_s for d, _ in devices)
    return ConfigError(f"the model's {shape.num_blocks} blocks ({total:.2f} GB) do not fit on the {len(devices)} "
                       f"device(s) (free {frees}){' even with offload' if streams else ''}: {fix}")


def _plan(devices: list[tuple[DeviceProfile, list[float]]], front_ms: float, shape: ModelShape, link_ms: float,
          steps: int, in_flight: int | None, window: int, allow_offload: bool, front: str = "auto") -> Plan:
    """The plan with the front in the caller; when the caller is its bottleneck (or ``front="stage"``),
    also the plan with the front on the stages, kept when it is predicted faster."""
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if front_ms < 0 or link_ms < 0:
        raise ConfigError(f"front_ms and link_ms must not be negative (got {front_ms}, {link_ms}): pass measured times")
    if front not in ("caller", "stage", "auto"):
        raise ConfigError(f"front={front!r} is not known: use 'caller', 'stage' or 'auto'")
    caller = None if front == "stage" else _assemble(devices, front_ms, shape, link_ms, steps, in_flight, window,
                                                     allow_offload, on_stage=False)
    if caller is not None and (front == "caller" or not caller.caller_is_bottleneck):
        return caller
    staged = _assemble(devices, front_ms, shape, link_ms, steps, in_flight, window, allow_offload, on_stage=True)
    if caller is None:
        return staged
    moved = staged.predicted_images_per_s > caller.predicted_images_per_s
    vs = (f"predicted {staged.predicted_images_per_s:.4g} images/s with the front on the stages against "
          f"{caller.predicted_images_per_s:.4g} with it in the caller")
    if moved:
        staged.notes.insert(0, f"the caller was the bottleneck (its embedders and final layer take {front_ms:.2f} ms "
                               f"per step, as long as or longer than any stage): the front runs on the first and last "
                               f"stages instead (front='stage'): {vs}")
        return staged
    caller.notes.append(f"moving the front to the stages is not predicted faster: {vs}")
    return caller


def _assemble(devices: list[tuple[DeviceProfile, list[float]]], front_ms: float, shape: ModelShape, link_ms: float,
              steps: int, in_flight: int | None, window: int, allow_offload: bool, on_stage: bool) -> Plan:
    """The best ranges and their prediction, with the front in the caller or on the stages."""
    stage_front = front_ms if on_stage else None
    found: tuple = ((_INF, _INF, 0), [], devices)
    for order in _orders(devices):
        score, ranges = _best_ranges(order, shape, link_ms, window, allow_offload, stage_front)
        if _better(score, found[0]):
            found = (score, ranges, order)
    score, ranges, order = found
    if score[0] == _INF:
        raise _no_fit(devices, shape, allow_offload)
    stages = []
    for d, j, i in ranges:
        dev, times = order[d]
        parts = _front_parts(dev, front_ms) if on_stage else None
        ms, off, need, fms = _stage_cost(dev, times, shape, j, i, link_ms, window, allow_offload, parts)
        stages.append(PlanStage(device=dev.name, blocks=str(shape.range(j, i)), start=j, stop=i, ms=round(ms, 4),
                                weight_bytes=sum(shape.block_bytes[j:i]), need_bytes=need, free_bytes=dev.free_bytes,
                                offload=off, stage=dict(dev.stage), front_ms=round(fms, 4)))
    used = {order[d][0].name for d, _, _ in ranges}
    slowest = max(range(len(stages)), key=lambda s: stages[s].ms)
    caller_ms = 0.0 if on_stage else front_ms  # with the front on the stages the caller only samples
    caller_bound = caller_ms >= stages[slowest].ms
    bottleneck_ms = max(caller_ms, stages[slowest].ms)
    latency = caller_ms + sum(s.ms for s in stages) + link_ms  # one image's step: front, every stage, first hop
    m = in_flight or len(stages) + 1
    # Per step: M images share the pipeline, but none goes faster than the slowest stage allows.
    per_step_s = max(bottleneck_ms, latency / m) / 1000
    notes = []
    bottleneck = "caller" if caller_bound else f"stage {slowest} ({stages[slowest].device})"
    if caller_bound:
        notes.append(f"the caller is the bottleneck: its embedders and final layer take {front_ms:.2f} ms per step, "
                     f"as long as or longer than any stage ({stages[slowest].ms:.2f} ms): more stages cannot help; "
                     f"run the calling process on a faster device")
    if any(s.offload for s in stages):
        notes.append("stages marked offload stream their weights from host memory (OffloadSpec) because they "
                     "cannot hold their share")
    unused = [d.name for d, _ in devices if d.name not in used]
    if unused:
        notes.append(f"not worth a stage: {', '.join(unused)} (adding it would not make the slowest stage faster)")
    single = _single_device(devices, shape, front_ms, steps)
    return Plan(stages=stages, front="stage" if on_stage else "caller", front_ms=round(front_ms, 4),
                link_ms=round(link_ms, 4), bottleneck=bottleneck, bottleneck_ms=round(bottleneck_ms, 4),
                step_latency_ms=round(latency, 4), steps=steps, in_flight=m,
                predicted_images_per_s=1.0 / (per_step_s * steps), single_device_images_per_s=single,
                unused_devices=unused, notes=notes, devices=[d for d, _ in devices])


def _single_device(devices: list[tuple[DeviceProfile, list[float]]], shape: ModelShape, front_ms: float,
                   steps: int) -> float | None:
    """Images/s of the fastest device that holds every block, running one image at a time (no hops)."""
    best = None
    for dev, times in devices:
        if dev.free_bytes is None or sum(shape.block_bytes) + dev.work_bytes <= dev.free_bytes:
            ms = sum(times) + front_ms
            best = ms if best is None else min(best, ms)
    return None if best is None else 1000.0 / (best * steps)


def auto_plan(checkpoint: str, stages: int | None = None, threads: list[int] | None = None, *, width: int = 1024,
              height: int = 1024, txt_tokens: int = 512, steps: int = 20, in_flight: int | None = None,
              dtype: str = "auto", repeats: int = 3, allow_offload: bool = True, timeout_s: float = 600,
              front: str = "auto") -> Plan:
    """Measure the candidate devices (every GPU of the cluster, or ``stages`` CPU stages with ``threads``
    torch threads each; blocks and the front's parts) and the caller's front at ``width`` x ``height``,
    then plan (``front`` as in ``plan_for``)."""
    import ray

    from mesh_ray.cluster.resources import cluster_gpus
    from mesh_ray.models.checkpoint import inspect
    from mesh_ray.split.probing import candidates, profile_devices, share_host_memory
    from mesh_ray.actors.profiling import measure_front, tokens_for

    if not ray.is_initialized():
        raise ConfigError("auto_plan needs Ray: call mesh_ray.connect() first")
    info = inspect(checkpoint)
    cfg = info.config
    img_tokens = tokens_for(width, height)
    if dtype == "auto":
        dtype = "bfloat16" if cluster_gpus() >= 1 and not threads else "float32"
    fields = candidates(stages, threads)
    profiles, link_ms = profile_devices(cfg, fields, img_tokens, txt_tokens, dtype, repeats, timeout_s)
    front_ms = measure_front(cfg, img_tokens, txt_tokens, dtype, repeats)
    shape = ModelShape.from_config(cfg, 2 if dtype in ("bfloat16", "float16") else 4)
    return plan_profiles(share_host_memory(profiles), front_ms, shape, link_ms=link_ms, steps=steps,
                         in_flight=in_flight, allow_offload=allow_offload, front=front)


def resolve_plan(checkpoint: str, plan: "str | Plan", stages: Any, n_blocks_remote: int | None,
                 plan_options: dict | None, option_kwargs: dict) -> tuple[Plan, list[StageSpec], dict]:
    """``mesh.split(plan=...)``: the plan, its stage list, and the split options it needs (offload)."""
    if n_blocks_remote is not None:
        raise ConfigError("give either plan or n_blocks_remote, not both")
    if isinstance(plan, str):
        if plan != "auto":
            raise ConfigError(f"plan={plan!r} is not known: use plan='auto' or a Plan from mesh_ray.auto_plan")
        if stages is not None and not isinstance(stages, int):
            raise ConfigError("plan='auto' chooses the block ranges: give stages as a number of candidates, not a list")
        popts = dict(plan_options or {})
        if option_kwargs.get("front", "auto") != "auto":  # the split's own choice is what gets planned
            popts.setdefault("front", option_kwargs["front"])
        plan = auto_plan(checkpoint, stages, **popts)
    elif not isinstance(plan, Plan):
        raise ConfigError(f"plan must be 'auto' or a Plan, got {type(plan).__name__}")
    elif stages is not None:
        raise ConfigError("a Plan already fixes the stages: do not pass stages too")
    logging.getLogger("mesh_ray").info("stage plan:\n%s", plan.table())
    kwargs = dict(option_kwargs)
    if kwargs.get("front", "auto") == "auto":
        kwargs["front"] = plan.front
    if plan.needs_offload and kwargs.get("offload") is None:
        kwargs["offload"] = OffloadSpec()
    return plan, plan.stage_specs(), kwargs


__all__ = ["auto_plan", "plan_for", "plan_profiles", "resolve_plan"]
