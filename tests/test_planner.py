"""The stage planner: exact cover, memory limits, offload fallback, impossible fits; measured on real Ray actors."""

import itertools
import random

import pytest
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.mesh import connect
from mesh_ray.models.blocks import check_cover, parse_range
from mesh_ray.models.flux import preset
from mesh_ray.split.plan import ModelShape, Plan
from mesh_ray.split.planner import plan_for

from helpers import inputs, local_model

UNIFORM = ModelShape(depth=10, num_single=20, block_bytes=(100,) * 30)


def covered(plan: Plan, shape: ModelShape) -> None:
    ranges = [parse_range(s.blocks, shape.depth, shape.num_single) for s in plan.stages]
    check_cover(ranges)  # raises on overlap, gap or overrun
    assert [(r.start, r.stop) for r in ranges] == [(s.start, s.stop) for s in plan.stages]


def test_ranges_cover_the_model_exactly_once_for_random_devices():
    rng = random.Random(0)
    shape = ModelShape.from_config(preset("flux1-dev"), 2)
    for _ in range(12):
        k = rng.randint(1, 5)
        times = [(rng.uniform(1, 10), rng.uniform(0.5, 5)) for _ in range(k)]
        mems = [rng.choice([None, int(rng.uniform(6e9, 30e9))]) for _ in range(k)]
        try:
            plan = plan_for(times, rng.uniform(0, 5), mems, shape, h2d_bytes_per_s=16e9)
        except ConfigError as e:
            assert "do not fit" in str(e)
            continue
        covered(plan, shape)
        assert 1 <= len(plan.stages) <= k


def test_slower_device_gets_fewer_blocks_and_the_bottleneck_is_minimal():
    plan = plan_for([1.0, 2.0], 0.0, None, UNIFORM)
    assert [s.stop - s.start for s in plan.stages] == [20, 10]
    assert plan.bottleneck_ms == 20.0
    assert [(d.name, d.single_ms) for d in plan.devices] == [("device 0", 1.0), ("device 1", 2.0)]  # planned from
    # Brute force over every split of 12 blocks with mixed costs onto 3 devices in every order.
    shape = ModelShape(depth=4, num_single=8, block_bytes=(1,) * 12)
    speeds = [(3.0, 1.0), (5.0, 2.5), (1.5, 0.7)]
    plan = plan_for(speeds, 0.0, None, shape)
    best = float("inf")
    for order in itertools.permutations(range(3)):
        per = [[speeds[d][0]] * 4 + [speeds[d][1]] * 8 for d in order]
        for a, b in itertools.combinations_with_replacement(range(13), 2):
            cuts = [(0, a), (a, b), (b, 12)]
            best = min(best, max(sum(per[i][s:e]) for i, (s, e) in enumerate(cuts)))
    assert plan.bottleneck_ms == pytest.approx(best)
    covered(plan, shape)


def test_memory_limits_are_respected_and_offload_is_the_fallback():
    free = plan_for([1.0, 1.0], 0.0, [None, None], UNIFORM)
    assert [s.stop - s.start for s in free.stages] == [15, 15]
    tight = plan_for([1.0, 1.0], 0.0, [None, 800], UNIFORM)  # device 1 holds at most 8 blocks of 100 bytes
    assert all(s.need_bytes <= (s.free_bytes or float("inf")) for s in tight.stages)
    small = next(s for s in tight.stages if s.device == "device 1")
    assert small.stop - small.start == 8 and not small.offload
    covered(tight, UNIFORM)
    # Neither holds its share: with a host-to-device link both stream their weights.
    streamed = plan_for([1.0, 1.0], 0.0, [900, 900], UNIFORM, h2d_bytes_per_s=1e6)
    assert streamed.needs_offload and all(s.need_bytes <= 900 for s in streamed.stages)
    covered(streamed, UNIFORM)


def test_impossible_fit_is_one_line_error():
    with pytest.raises(ConfigError) as e:
        plan_for([1.0, 1.0], 0.0, [500, 500], UNIFORM)  # 3000 bytes of blocks, no offload path
    msg = str(e.value)
    assert "do not fit" in msg and "\n" not in msg and "add a device" in msg
    with pytest.raises(ConfigError, match="allow offload"):
        plan_for([1.0], 0.0, [50], UNIFORM, h2d_bytes_per_s=1e9, allow_offload=False)
    with pytest.raises(ConfigError, match="30 blocks"):
        plan_for([[1.0] * 7], 0.0, None, UNIFORM)


def test_caller_bottleneck_is_reported():
    plan = plan_for([1.0, 1.0], 50.0, None, UNIFORM, front="caller")
    assert plan.caller_is_bottleneck and plan.bottleneck == "caller"
    assert any("caller is the bottleneck" in n for n in plan.notes)
    assert "bottleneck: caller" in plan.table()
    fast = plan_for([1.0, 1.0], 1.0, None, UNIFORM, steps=10, in_flight=3)
    assert not fast.caller_is_bottleneck
    # 15 ms per stage, 31 ms one image's step: three in flight are bound by the slowest stage.
    assert fast.predicted_images_per_s == pytest.approx(1000 / (15.0 * 10))


def test_a_slow_caller_gets_its_front_on_the_stages():
    shape = ModelShape(depth=10, num_single=20, block_bytes=(100,) * 30, front_bytes=50)
    kept = plan_for([1.0, 1.0], 50.0, None, shape, front="caller")
    plan = plan_for([1.0, 1.0], 50.0, None, shape)  # front="auto": the caller (50 ms) is the bottleneck
    assert plan.front == "stage" and not plan.caller_is_bottleneck
    assert plan.predicted_images_per_s > kept.predicted_images_per_s
    # The first stage embeds, the last runs the final layer (half the caller's front each, unmeasured),
    # and the ranges balance the stages with that work on them: 25 + 15 blocks against 15 blocks + 25.
    assert [s.front_ms for s in plan.stages] == [25.0, 25.0] and [s.ms for s in plan.stages] == [40.0, 40.0]
    assert all(s.need_bytes == (s.stop - s.start) * 100 + 50 for s in plan.stages)  # the front's weights too
    assert any("front='stage'" in n for n in plan.notes) and "on the stages" in plan.table()
    covered(plan, shape)
    # Where the devices are slow at the front itself, moving it is not faster: it stays, and the plan says why.
    slow = plan_for([1.0, 1.0], 50.0, None, shape, stage_front_ms=[(200.0, 200.0)] * 2)
    assert slow.front == "caller" and slow.caller_is_bottleneck
    assert any("not predicted faster" in n for n in slow.notes)
    # A caller that is not the bottleneck keeps its front; front="stage" forces it onto the stages.
    assert plan_for([1.0, 1.0], 1.0, None, shape).front == "caller"
    assert plan_for([1.0, 1.0], 1.0, None, shape, front="stage").front == "stage"
    with pytest.raises(ConfigError, match="front='middle' is not known"):
        plan_for([1.0], 1.0, None, shape, front="middle")


def test_mesh_split_runs_a_plan_with_the_front_on_the_stages(mesh, tiny_ckpts):
    from mesh_ray.split.sampler import generate, random_conditioning

    path = str(tiny_ckpts["flux1"])
    cfg = local_model(path).config
    plan = plan_for([1.0, 1.0], 1e3, None, ModelShape.from_config(cfg, 4))  # a caller far slower than the blocks
    assert plan.front == "stage"
    staged = mesh.split(path, plan=plan, codec="raw")
    caller = mesh.split(path, stages=[s.blocks for s in plan.stages], codec="raw")
    assert staged.front_on_stage and not caller.front_on_stage
    assert mesh.split(path, plan=plan, front="caller").front_on_stage is False  # the split's own choice wins
    txt, y = random_conditioning(cfg, seed=3)
    gen = dict(width=32, height=32, steps=2, seed=1, progress=False)
    assert torch.equal(generate(staged, txt, y, **gen), generate(caller, txt, y, **gen))


def test_auto_plan_measures_real_stages_and_mesh_split_uses_it(ray_local, tiny_ckpts):
    path = str(tiny_ckpts["flux1"])
    model = local_model(path)
    args = inputs(model.config)
    with torch.inference_mode():
        ref = model(*args)
    mesh = connect()
    try:
        split = mesh.split(path, stages=2, plan="auto", plan_options={"threads": [1, 1], "width": 64, "height": 64,
                                                                      "txt_tokens": 16, "steps": 2, "repeats": 1})
        plan = split.plan
        covered(plan, ModelShape.from_config(model.config, 4))
        assert plan.front_ms > 0 and plan.predicted_images_per_s > 0 and plan.front in ("caller", "stage")
        assert split.front_on_stage == (plan.front == "stage")
        assert all(s.stage["torch_threads"] == 1 for s in plan.stages) and "predicted" in plan.table()
        assert [d.stage["torch_threads"] for d in plan.devices] == [1, 1]  # the probed candidates, kept with the plan
        assert all(d.double_ms > 0 and d.single_ms > 0 for d in plan.devices)
        assert [str(s.range) for s in split.stages] == [s.blocks for s in plan.stages]
        assert torch.allclose(split(*args), ref, atol=1e-5)
        # A given plan whose stage cannot hold its share turns on weight streaming for the split.
        shape = ModelShape.from_config(model.config, 4)
        tight = plan_for([1.0, 1.0], 0.0, [None, max(shape.block_bytes)], shape, h2d_bytes_per_s=1e9)
        assert tight.needs_offload
        streamed = mesh.split(path, plan=tight)
        assert streamed.options.offload is not None and streamed.options.offload.enabled
        assert torch.allclose(streamed(*args), ref, atol=1e-5)
        with pytest.raises(ConfigError, match="plan='auto' or a Plan"):
            mesh.split(path, plan="fastest")
    finally:
        mesh.close()


def test_plan_cli_json_and_error(tiny_ckpts, tmp_path):
    from helpers import last_json, run

    out = run("plan", str(tiny_ckpts["flux2"]), "--stages", "2", "--width", "64", "--height", "64",
              "--txt-tokens", "16", "--steps", "2", "--repeats", "1", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    plan = last_json(out)
    assert [s["blocks"] for s in plan["stages"]][0].startswith("double:0")
    assert plan["predicted_images_per_s"] > 0 and plan["bottleneck"] and plan["in_flight"] == len(plan["stages"]) + 1
    assert plan["front"] in ("caller", "stage") and all("front_ms" in s for s in plan["stages"])
    assert len(plan["devices"]) == 2 and all(d["double_ms"] > 0 and d["single_ms"] > 0 for d in plan["devices"])
    out = run("plan", str(tiny_ckpts["flux2"]), "--stages", "2", "--width", "64", "--height", "64",
              "--txt-tokens", "16", "--steps", "2", "--repeats", "1", "--front", "stage", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    staged = last_json(out)
    assert staged["front"] == "stage" and staged["stages"][0]["front_ms"] > 0 and staged["stages"][-1]["front_ms"] > 0
    out = run("plan", str(tiny_ckpts["flux2"]), "--width", "60")
    lines = [l for l in out.stderr.strip().splitlines() if l.strip() and "INFO" not in l]
    assert out.returncode == 1 and len(lines) == 1 and "multiple of 16" in lines[0]


def test_auto_plan_pins_one_stage_to_each_gpu_node(tiny_ckpts):
    import ray
    from ray.cluster_utils import Cluster

    path = str(tiny_ckpts["flux1"])
    ray.shutdown()  # this test needs its own multi-node cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]  # logical GPUs; CPU compute here
        cluster.wait_for_nodes()
        mesh = connect(cluster.address)
        split = mesh.split(path, plan="auto", codec="raw",  # raw: "auto" would code the cross-node links
                           plan_options={"width": 64, "height": 64, "txt_tokens": 16, "steps": 2, "repeats": 1,
                                         "dtype": "float32"})
        plan = split.plan
        assert len(plan.stages) == 2 and all(s.stage["num_gpus"] == 1 for s in plan.stages)
        assert {s.stage["node"] for s in plan.stages} == {n.node_id for n in nodes}
        assert [i["node_id"] for i in split.stage_info()] == [s.stage["node"] for s in plan.stages]
        model = local_model(path)
        args = inputs(model.config)
        with torch.inference_mode():
            ref = model(*args)
        assert torch.allclose(split(*args), ref, atol=1e-5)
        mesh.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
