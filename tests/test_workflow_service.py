"""Many clients: round-robin fairness, cancel, progress events, and two client processes on the service."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from mesh_ray.workflow import WorkflowError, Workflows
from mesh_ray.workflow.scheduler import Scheduler
from mesh_ray.workflow.service import find_service, serve, stop_service


def _sleep_graph(seconds: float, tag: str) -> dict:
    return {"s": {"class_type": "Sleep", "inputs": {"seconds": seconds, "value": tag}},
            "c": {"class_type": "Checksum", "inputs": {"data": ["s", 0]}}}


def _started(s: Scheduler, run_id: str) -> float:
    return next(e["t"] for e in s.events(run_id) if e["type"] == "run_started")


def test_round_robin_across_clients(ray_local):
    """Client A queues three runs, then B one: B runs second, not after all of A's."""
    s = Scheduler(max_parallel=1, measure_store=False)
    try:
        a = [s.submit(_sleep_graph(0.3, f"a{i}"), "A") for i in range(3)]
        b = s.submit(_sleep_graph(0.3, "b"), "B")
        for rid in a + [b]:
            assert s.result(rid, timeout=120)["status"] == "finished"
        order = sorted(a + [b], key=lambda r: _started(s, r))
        assert order == [a[0], b, a[1], a[2]]
    finally:
        s.shutdown()


def test_cancel_running_and_queued(ray_local):
    wf = Workflows(Scheduler(max_parallel=1, measure_store=False), remote=False, client_id="me")
    try:
        long = wf.submit(_sleep_graph(60, "long"))
        queued = wf.submit(_sleep_graph(60, "queued"))
        deadline = time.monotonic() + 60
        while long.status() != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        assert long.cancel() and queued.cancel()
        r = long.result(timeout=30)
        assert r.status == "cancelled" and time.monotonic() - t0 < 20
        assert queued.result(timeout=10).status == "cancelled"
        assert [e["type"] for e in long.events()][-1] == "run_cancelled"
        assert not long.cancel()  # already ended
        with pytest.raises(WorkflowError, match="was cancelled"):
            r.raise_for_status()
    finally:
        wf.close()


def test_progress_events_embedded(ray_local):
    wf = Workflows(Scheduler(measure_store=False), remote=False)
    try:
        events: list[dict] = []
        result = wf.run(_sleep_graph(0.5, "p"), release_level=2, on_event=events.append, timeout_s=120)
        kinds = [e["type"] for e in events]
        assert kinds[0] == "run_queued" and kinds[-1] == "run_finished"
        assert {"run_started", "node_started", "node_finished", "progress"} <= set(kinds)
        steps = [e for e in events if e["type"] == "progress"]
        assert steps[-1]["step"] == steps[-1]["total"] == 5 and steps[-1]["node"] == "s"
        assert result.outputs["c"]
    finally:
        wf.close()


CLIENT = textwrap.dedent("""
    import json, sys, ray
    from mesh_ray.workflow import Workflows
    address, tag = sys.argv[1], sys.argv[2]
    ray.init(address=address, namespace="mesh-ray", log_to_driver=False, configure_logging=False)
    wf = Workflows.connect(address, service=True, client_id=tag)
    graph = {"s": {"class_type": "Sleep", "inputs": {"seconds": 1.0, "value": tag}},
             "c": {"class_type": "Checksum", "inputs": {"data": ["s", 0]}}}
    events = []
    result = wf.run(graph, release_level=2, on_event=events.append, timeout_s=120)
    print(json.dumps({"status": result.status, "run_id": result.run_id, "digest": result.outputs["c"],
                      "kinds": sorted({e["type"] for e in events})}))
""")


def test_two_client_processes_through_service(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    info = serve(max_parallel=2)
    try:
        assert info["kind"] == "workflow-service" and find_service() is not None
        procs = [subprocess.Popen([sys.executable, str(script), address, tag], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for tag in ("alice", "bob")]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-2000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
        assert [o["status"] for o in outs] == ["finished", "finished"]
        assert outs[0]["run_id"] != outs[1]["run_id"] and outs[0]["digest"] != outs[1]["digest"]
        for o in outs:
            assert {"run_started", "node_finished", "progress", "run_finished"} <= set(o["kinds"])
        here = Workflows.connect(service=True, client_id="carol")
        run = here.submit(_sleep_graph(60, "carol"))
        deadline = time.monotonic() + 60
        while run.status() != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.cancel() and run.result(timeout=30).status == "cancelled"
    finally:
        assert stop_service()
    assert find_service() is None
