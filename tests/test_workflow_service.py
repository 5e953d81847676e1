"""Many clients: round-robin fairness, cancel, progress events, and two client processes on the service."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.workflow import TESTING_NODES, Graph, WorkflowError, Workflows, validate_graph
from mesh_ray.workflow.scheduler import Scheduler
from mesh_ray.workflow.service import find_service, serve, stop_service


def _sleep_graph(seconds: float, tag: str) -> Graph:
    """Sleep, then a digest: testing node types, so the Graph names their module."""
    return validate_graph({"s": {"class_type": "Sleep", "inputs": {"seconds": seconds, "value": tag}},
                           "c": {"class_type": "Checksum", "inputs": {"data": ["s", 0]}}}, modules=[TESTING_NODES])


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
    from mesh_ray.workflow import TESTING_NODES, Workflows
    address, tag = sys.argv[1], sys.argv[2]
    ray.init(address=address, namespace="mesh-ray", log_to_driver=False, configure_logging=False)
    wf = Workflows.connect(address, service=True, client_id=tag)
    graph = {"s": {"class_type": "Sleep", "inputs": {"seconds": 1.0, "value": tag}},
             "c": {"class_type": "Checksum", "inputs": {"data": ["s", 0]}}}
    events = []
    result = wf.run(graph, release_level=2, on_event=events.append, timeout_s=120, node_modules=[TESTING_NODES])
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
        assert info["node_module_prefixes"] == ["mesh_ray."]  # the allow-list of the process that started it
        bare = {"s": {"class_type": "Sleep", "inputs": {"seconds": 0.1, "value": "m"}}}  # a dict: no modules
        with pytest.raises(ConfigError) as e:  # the service validates: this client sends JSON and names only
            here.submit(bare)
        assert str(e.value) == (f"node 's' has unknown class_type 'Sleep': it is a node type of module {TESTING_NODES}, "
                                f"which this run does not load: pass --nodes {TESTING_NODES} "
                                f"(node_modules=[{TESTING_NODES!r}] in Python)")
        with pytest.raises(ConfigError, match="^node module 'json' is not allowed \\(allowed: mesh_ray.\\): "):
            here.submit(bare, node_modules=["json"])
        assert here.run(bare, node_modules=[TESTING_NODES], timeout_s=120).status == "finished"
        with pytest.raises(ConfigError, match="unknown class_type 'Sleep'"):  # named by runs before, still not built in
            here.submit(bare)
    finally:
        assert stop_service()
    assert find_service() is None


LEAVING_CLIENT = textwrap.dedent("""
    import json, sys, time, ray
    from mesh_ray.workflow import TESTING_NODES, Workflows
    address = sys.argv[1]
    ray.init(address=address, namespace="mesh-ray", log_to_driver=False, configure_logging=False)
    wf = Workflows.connect(address, service=True, client_id="leaver")
    held = {"a": {"class_type": "AllocateMemory", "inputs": {"bytes": 40_000_000, "seed": 3}},
            "c": {"class_type": "Checksum", "inputs": {"data": ["a", 0]}}}
    wf.run(held, release_level=0, timeout_s=120, node_modules=[TESTING_NODES])  # level 0: the service keeps 40 MB
    sleep = {"s": {"class_type": "Sleep", "inputs": {"seconds": 120, "value": "x"}},
             "c": {"class_type": "Checksum", "inputs": {"data": ["s", 0]}}}
    runs = [wf.submit(sleep, node_modules=[TESTING_NODES]).run_id for _ in range(2)]
    print(json.dumps(runs), flush=True)
    time.sleep(600)
""")


def _until(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_client_that_disconnects_has_its_runs_cancelled_and_cache_freed(ray_local, tmp_path):
    from mesh_ray.workflow.memory import store_bytes_used
    from mesh_ray.workflow.service import service_call

    address = ray_local.get_runtime_context().gcs_address
    script = tmp_path / "leaver.py"
    script.write_text(LEAVING_CLIENT)
    serve(max_parallel=2)
    proc = None
    try:
        handle = find_service()
        stay = Workflows.connect(service=True, client_id="stayer")
        proc = subprocess.Popen([sys.executable, str(script), address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        running, queued = json.loads(line)
        _until(lambda: stay._do("status", running) == "running", 60, "the leaver's run to start")
        info = service_call(handle, "info")
        assert "leaver" in info["clients"] and "leaver" in info["caches"]
        held = store_bytes_used()
        other = stay.submit(_sleep_graph(1.0, "other"))
        proc.kill()
        proc.wait(timeout=30)
        _until(lambda: "leaver" in service_call(handle, "info")["dropped"], 60, "the service to notice the client left")
        for rid in (running, queued):
            r = stay._do("result", rid, 30.0, timeout=90)
            assert r["status"] == "cancelled" and "leaver disconnected" in r["error"], r
        info = _until(lambda: (i := service_call(handle, "info")) and "leaver" not in i["caches"] and i, 60, "its cache to go")
        assert "leaver" not in info["clients"] and "stayer" in info["clients"]
        assert held is not None and _until(lambda: held - store_bytes_used() >= 30_000_000, 60, "the 40 MB to be freed")
        assert other.result(timeout=120).status == "finished"  # the other client was not touched
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        assert stop_service()


def test_service_restarted_under_a_client(ray_local, monkeypatch):
    from mesh_ray.bench.faults import kill_service

    serve(max_parallel=1)
    try:
        wf = Workflows.connect(service=True, client_id="dave")
        held = wf.submit(_sleep_graph(3, "held"))
        queued = wf.submit(_sleep_graph(0.2, "queued"))
        _until(lambda: held.status() == "running", 60, "the held run to start")
        old_ids = (held.run_id, queued.run_id)
        kill_service()  # as a crash would: no shutdown
        monkeypatch.setenv("MESH_RAY_NODE_MODULE_PREFIXES", "mesh_ray.,json")  # the operator widens the allow-list
        assert serve(max_parallel=1)["node_module_prefixes"] == ["mesh_ray.", "json"]  # a new service, same name
        # nothing is lost: the client attached to the new service and submitted both runs again
        assert held.status() in ("queued", "running") and (held.run_id, queued.run_id) != old_ids
        events = held.events()
        assert events[0]["type"] == "run_resubmitted" and events[0]["previous"] == old_ids[0]
        assert held.result(timeout=120).status == "finished" and queued.result(timeout=120).status == "finished"
        again = wf.submit(_sleep_graph(0.2, "again"))  # the client attached to the new service
        assert again.result(timeout=120).status == "finished"
        monkeypatch.delenv("MESH_RAY_NODE_MODULE_PREFIXES")  # the client's own setting does not matter
        with pytest.raises(ConfigError, match="^node module 'json' defines no node types"):  # allowed, imported
            wf.submit({"1": {"class_type": "SaveImage", "inputs": {"images": 1}}}, node_modules=["json"])
        kill_service()
        with pytest.raises(ClusterError, match="none runs now") as e:
            again.status()
        assert "\n" not in str(e.value)
    finally:
        stop_service()
