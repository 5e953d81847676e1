"""mesh-ray's metrics, read back from Ray's own Prometheus endpoint on the session cluster."""

from __future__ import annotations

import re
import time
from pathlib import Path

import ray
import torch

from mesh_ray.cluster import metrics
from mesh_ray.cluster.metrics import METRICS, read_metrics, total
from mesh_ray.models.vae import write_random_vae
from mesh_ray.vae.service import VaeService
from mesh_ray.workflow import TESTING_NODES
from mesh_ray.workflow.scheduler import Scheduler

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _poll(check, timeout: float = 90.0) -> dict:
    """Read the endpoint until ``check(samples)`` holds (Ray exports every few seconds)."""
    end = time.monotonic() + timeout
    while True:
        samples = read_metrics()
        if check(samples) or time.monotonic() > end:
            return samples
        time.sleep(1.0)


def test_docs_list_every_metric():
    text = DOC.read_text()
    documented = set(re.findall(r"`ray_(mesh_ray_[a-z_]+)`", text))
    assert documented == set(METRICS), documented ^ set(METRICS)


def test_vae_retries_restarts_and_queue_depth_reach_prometheus(ray_local, tmp_path):
    vae = write_random_vae(tmp_path / "vae.safetensors", "tiny-flux1", seed=3)
    base = read_metrics()
    with VaeService(vae, replicas=1, output_dir=tmp_path, num_cpus=0.5, torch_threads=1) as svc:
        svc.decode(torch.randn(1, 16, 8, 8), timeout=60)
        actor = svc.actors()[0]
        promise = svc.decode(torch.randn(1, 16, 96, 96), mode="promise", timeout=300)
        while not ray.get(actor.info.remote(), timeout=30)["busy"]:
            time.sleep(0.05)
        ray.kill(actor)
        assert promise.result(300).shape == (1, 768, 768, 3)  # re-sent to the restarted replica
    s = Scheduler(max_parallel=1, measure_store=False)
    try:
        graph = {"s": {"class_type": "Sleep", "inputs": {"seconds": 30, "value": "q"}}}
        runs = [s.submit(graph, "m", node_modules=[TESTING_NODES]) for _ in range(3)]  # one runs, two wait
        while s.status(runs[0]) != "running":
            time.sleep(0.05)
        decodes = "ray_mesh_ray_vae_decode_ms_count"

        def seen(x: dict) -> bool:
            return (total(x, decodes) - total(base, decodes) >= 2
                    and total(x, "ray_mesh_ray_retries_total", kind="vae_decode") > total(base, "ray_mesh_ray_retries_total", kind="vae_decode")
                    and total(x, "ray_mesh_ray_restarts_total", kind="vae_replica") > total(base, "ray_mesh_ray_restarts_total", kind="vae_replica")
                    and total(x, "ray_mesh_ray_service_runs", state="queued") >= 2)

        got = _poll(seen)
        assert seen(got), {k: v for k, v in got.items() if "bucket" not in k}
    finally:
        for r in runs:
            s.cancel(r)
        s.shutdown()


def test_split_step_wire_and_restart_metrics_reach_prometheus(ray_local, tiny_ckpts):
    from mesh_ray.mesh import connect
    from helpers import inputs

    base = read_metrics()
    with connect().split(str(tiny_ckpts["flux1"]), stages=2, codec="quant8") as split:
        args = inputs(split.config)
        split(*args)
        ray.kill(split.segments[1].actor, no_restart=False)
        split(*args)  # stage 1 restarts, the step is sent again
    link = dict(link="stage0->stage1", mode="quant8")

    def grew(x: dict, name: str, by: float = 1, **labels: str) -> bool:
        return total(x, name, **labels) - total(base, name, **labels) >= by

    def seen(x: dict) -> bool:
        return (grew(x, "ray_mesh_ray_stage_step_ms_count", 2, stage="0")
                and grew(x, "ray_mesh_ray_stage_step_ms_count", 2, stage="1")
                and grew(x, "ray_mesh_ray_wire_encode_ms_count", 2, **link)
                and grew(x, "ray_mesh_ray_wire_decode_ms_count", 2, **link)
                and grew(x, "ray_mesh_ray_wire_raw_bytes_total", 1, **link)
                and grew(x, "ray_mesh_ray_retries_total", 1, kind="stage_step")
                and grew(x, "ray_mesh_ray_restarts_total", 1, kind="stage"))

    got = _poll(seen)
    assert seen(got), {k: v for k, v in got.items() if "bucket" not in k}
    raw = total(got, "ray_mesh_ray_wire_raw_bytes_total", **link) - total(base, "ray_mesh_ray_wire_raw_bytes_total", **link)
    coded = total(got, "ray_mesh_ray_wire_coded_bytes_total", **link) - total(base, "ray_mesh_ray_wire_coded_bytes_total", **link)
    assert 0 < coded < raw  # quant8 moved fewer bytes than the raw tensors hold
