"""Pipelined sampling on real Ray: generate_many equals per-image generate bit for bit, overlaps images
across stages, bounds the images in flight, reports progress and order, and cancels."""

import re
import threading

import pytest
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.split.pipeline import ImageRequest, generate_many
from mesh_ray.split.sampler import generate, random_conditioning


def requests(cfg, n, steps=3, size=32):
    out = []
    for i in range(n):
        txt, y = random_conditioning(cfg, batch=1, txt_len=8, seed=100 + i)
        out.append(ImageRequest(txt=txt, y=y, width=size, height=size + 16 * (i % 2), steps=steps, seed=i))
    return out


@pytest.mark.parametrize("arch, layout", [("flux1", {"stages": 2}), ("flux2", {"stages": 3}),
                                          ("flux1", {"n_blocks_remote": 3})])  # front blocks in the caller
def test_generate_many_equals_generate_per_image_bit_for_bit(mesh, tiny_ckpts, arch, layout):
    split = mesh.split(str(tiny_ckpts[arch]), codec="raw", **layout)
    reqs = requests(split.config, 5)
    events = []
    res = generate_many(split, reqs, progress=False, callback=events.append)
    assert res.max_in_flight == len(split.stages) + 1
    assert sorted(res.order) == list(range(5)) and res.cancelled == []
    for i, r in enumerate(reqs):
        alone = generate(split, r.txt, r.y, width=r.width, height=r.height, steps=r.steps, seed=r.seed,
                         guidance=r.guidance, progress=False)
        assert torch.equal(res.latents[i], alone), f"image {i}"
    # Per-image progress: every step of every image once, in order per image; done last.
    for i in range(5):
        mine = [e for e in events if e.index == i]
        assert [e.step for e in mine] == [1, 2, 3] and mine[-1].done and not any(e.done for e in mine[:-1])
    assert [e.index for e in events if e.done] == res.order
    split.close()


def test_images_overlap_across_stages_and_in_flight_is_bounded(mesh, tiny_ckpts):
    split = mesh.split(str(tiny_ckpts["flux2"]), stages=2, torch_threads=1)
    reqs = requests(split.config, 4, steps=3, size=96)  # enough tokens that a stage call takes a while
    in_flight, seen = set(), []

    def track(ev):
        (in_flight.discard if ev.done else in_flight.add)(ev.index)
        seen.append(len(in_flight))

    res = generate_many(split, reqs, max_in_flight=2, progress=False, callback=track)
    assert max(seen) <= 2 and sorted(res.order) == [0, 1, 2, 3]
    first, second = (i["recent_calls"] for i in split.stage_info())
    assert len(first) == len(second) == 12  # 4 images x 3 steps through each stage
    overlaps = [(a, b) for a in first for b in second if a[0] < b[1] and b[0] < a[1]]
    assert overlaps, "stage 1 never worked while stage 0 did: images did not pipeline"
    split.close()


def test_cancel_stops_images_and_keeps_finished_ones(mesh, tiny_ckpts):
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=2)
    reqs = requests(split.config, 4, steps=2)
    stop = threading.Event()

    def on_event(ev):
        if ev.done:
            stop.set()  # cancel everything once the first image is finished

    res = generate_many(split, reqs, max_in_flight=1, progress=False, callback=on_event, cancel=stop)
    assert res.order == [0] and sorted(res.cancelled) == [1, 2, 3]
    assert res.latents[0] is not None and all(res.latents[i] is None for i in (1, 2, 3))
    # Cancel one image by index: the others finish.
    res = generate_many(split, reqs, progress=False, cancel=lambda i: i == 2)
    assert sorted(res.order) == [0, 1, 3] and res.cancelled == [2] and res.latents[2] is None
    split.close()


def test_bad_requests_are_one_line_errors(mesh, tiny_ckpts):
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=2)
    txt, y = random_conditioning(split.config, batch=1, txt_len=8)
    with pytest.raises(ConfigError, match="steps"):
        generate_many(split, [{"txt": txt, "y": y, "steps": 0}], progress=False)
    with pytest.raises(ConfigError, match="max_in_flight"):
        generate_many(split, [{"txt": txt, "y": y}], max_in_flight=0, progress=False)
    with pytest.raises(ConfigError, match="mesh.split"):
        generate_many(object(), [{"txt": txt, "y": y}], progress=False)
    split.close()


def test_bench_pipeline_cli_reports_every_figure():
    from helpers import last_json, run

    out = run("bench", "pipeline", "--quick", "--size", "32", "--steps", "1", "--in-flight", "1,2", "--images", "2",
              "--rounds", "1", "--json", timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    res = last_json(out)
    assert set(res["throughput_ratio"]) == {"1", "2"} and all(v > 0 for v in res["throughput_ratio"].values())
    assert all(0 <= v <= 1 for v in res["bubble_fraction"].values())
    assert res["planner_predicted_images_per_s"] > 0 and res["planner_measured_images_per_s"] > 0
    assert [h["blocks"] for h in res["hand_plans"]] == ["0-0 | 1-3", "0-1 | 2-3", "0-2 | 3-3"]
    assert res["even_split"] == "0-1 | 2-3" and res["planner_over_even_split"] > 0
    assert res["plan_front"] in ("caller", "stage") and res["planner_over_best_hand"] > 0
    # One stage 2x slower (half the threads): the planner against the even split, measured in the same run.
    # On a deeper model of the same width (12 blocks), with the ceiling of the best cut and both speed ratios.
    slow = res["slow_stage"]
    assert slow["model"] == {"hidden": 512, "depth": 1, "single": 11, "blocks": 12} and slow["size"] == 32
    assert slow["stage_threads"] == [2, 1] and slow["even_split"] == "0-5 | 6-11"
    assert [h["blocks"] for h in slow["hand_plans"]] == ["0-5 | 6-11"] and res["slow_planner_over_even_split"] > 0
    assert slow["cut_ceiling_equal_blocks"] == 1.5  # 8 | 4 blocks against 6 | 6 on 2:1 devices
    assert slow["cut_ceiling_2to1"] >= 1 and slow["cut_ceiling_probed"] >= 1  # the even split is one of the cuts
    assert set(slow["probe_block_ms"]) == {"2", "1"}
    assert slow["probe_speed_ratio"] > 0 and slow["pipelined_speed_ratio"] > 0
    assert len(slow["even_stage_ms_per_call"]) == len(slow["even_stage_ms_alone"]) == 2
    assert "best cut / even split at most" in out.stdout and "while pipelined" in out.stdout
    assert "planner / best hand plan" in out.stdout and "one stage 2x slower" in out.stdout
    # Progress on stderr: one numbered line per measurement, the last one numbered as the total.
    lines = [l for l in out.stderr.splitlines() if re.match(r"\[\d+/\d+\] ", l)]
    total = int(lines[-1].split("]")[0].split("/")[1])
    assert len(lines) == total and lines[-1].startswith(f"[{total}/{total}]") and res["wall_s"] > 0


def test_workflow_sample_many_equals_sample_per_image(ray_local, tmp_path):
    from mesh_ray.workflow import Executor
    from mesh_ray.workflow.graph import validate_graph

    graph = validate_graph({
        "1": {"class_type": "WriteRandomCheckpoint", "inputs": {"path": "m.safetensors", "preset": "tiny-flux1", "seed": 7}},
        "2": {"class_type": "LoadSplitDiT", "inputs": {"checkpoint": ["1", 0], "stages": 2}},
        "3": {"class_type": "SampleMany", "inputs": {"model": ["2", 0], "count": 3, "width": 32, "height": 32, "steps": 2,
                                                     "seed": 10, "conditioning_seed": 20}},
        "4": {"class_type": "Sample", "inputs": {"model": ["2", 0], "width": 32, "height": 32, "steps": 2, "seed": 12,
                                                 "conditioning_seed": 22}},
    })
    events = []
    ex = Executor(measure_store=False)
    try:
        res = ex.run(graph, 0, base_dir=str(tmp_path), outputs=["3", "4"], on_event=events.append).raise_for_status()
    finally:
        ex.close()
    many, one = res.outputs["3"][0], res.outputs["4"][0]
    assert many.shape[0] == 3 and torch.equal(many[2:3], one)
    steps = [e for e in events if e.get("node") == "3" and e.get("type") == "progress"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6] and {e["total"] for e in steps} == {6}


def test_a_stage_dying_mid_run_is_a_one_line_error(mesh, tiny_ckpts):
    import ray

    from mesh_ray.errors import StageError

    split = mesh.split(str(tiny_ckpts["flux1"]), stages=2)
    killed = []

    def kill_once(ev):
        if not killed:
            killed.append(ev.index)
            ray.kill(split.stages[1].actor)

    with pytest.raises(StageError) as e:
        generate_many(split, requests(split.config, 3, steps=3), progress=False, callback=kill_once)
    assert "\n" not in str(e.value) and "stage 1" in str(e.value)
    split.close()
