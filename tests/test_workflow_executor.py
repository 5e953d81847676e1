"""The executor on a real local Ray: release levels, re-execution on expansion, failures, level-0 cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh_ray.errors import ConfigError
from mesh_ray.bench.release import format_table, run_release_bench, scenario
from mesh_ray.workflow import TESTING_NODES, Executor, WorkflowError, run_graph
from mesh_ray.workflow.memory import min_live_bytes
from mesh_ray.workflow.graph import validate_graph

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MB = 1_000_000


def test_peak_memory_per_level_and_identical_outputs(ray_local):
    """The release PR's scenario: level 2 peaks at the minimum live set, far below level 0."""
    result = run_release_bench(loader_bytes=8 * MB, heavy_bytes=16 * MB)
    lv = result["levels"]
    assert result["min_live_bytes"] == pytest.approx(16 * MB, rel=0.01)
    assert lv["0"]["peak_bytes"] == pytest.approx(32 * MB, rel=0.01)  # both loaders + the heavy node
    assert lv["1"]["peak_bytes"] == pytest.approx(32 * MB, rel=0.01)  # loaders are referenced: kept
    assert lv["2"]["peak_bytes"] <= 1.05 * result["min_live_bytes"]
    assert lv["2"]["peak_bytes"] <= 0.6 * lv["0"]["peak_bytes"]
    assert result["outputs_identical"] and result["goal_met"]
    assert lv["0"]["outputs"]["6"] == lv["2"]["outputs"]["6"]
    json.dumps(result)
    assert "level 2" in format_table(result)


def test_min_live_bytes_is_largest_node_footprint():
    g = validate_graph(scenario(10, 30), modules=[TESTING_NODES])
    sizes = {"1": [10, 4], "2": [10, 4], "3": [16], "4": [16], "5": [30, 4], "6": [16]}
    assert min_live_bytes(g, sizes) == 30 + 16 + 16  # node 6: heavy data + digest in, digest out


def test_expansion_reruns_released_producer(ray_local):
    """Node 3 expands into a link to node 1's output 0, which level 2 released after node 2 ran."""
    results = {lvl: run_graph(EXAMPLES / "expand_rerun.json", lvl, measure_store=False, node_modules=[TESTING_NODES])
               for lvl in (0, 1, 2)}
    assert results[0].reexecuted == [] and results[1].reexecuted == []  # level 1 keeps referenced outputs
    assert results[2].reexecuted == ["1"]
    assert results[2].executed.count("1") == 2
    assert results[0].outputs["4"] == results[1].outputs["4"] == results[2].outputs["4"]


def test_level1_releases_unreferenced_and_reruns_for_expansion(ray_local):
    graph = {"1": {"class_type": "AllocateMemory", "inputs": {"bytes": 1000, "seed": 4}},
             "2": {"class_type": "Checksum", "inputs": {"data": ["1", 0]}},
             "3": {"class_type": "ExpandLink", "inputs": {"node": "1", "output": 1, "after": ["2", 0]}},
             "4": {"class_type": "Checksum", "inputs": {"data": ["3", 0]}}}
    events: list[dict] = []
    r1 = run_graph(graph, 1, measure_store=False, on_event=events.append, node_modules=[TESTING_NODES])
    r0 = run_graph(graph, 0, measure_store=False, node_modules=[TESTING_NODES])
    assert r1.reexecuted == ["1"] and r0.reexecuted == []
    assert r1.outputs["4"] == r0.outputs["4"]
    rerun = [e for e in events if e["type"] == "node_rerun"]
    assert rerun and "re-running node '1'" in rerun[0]["message"] and "node '3.pass' needs it" in rerun[0]["message"]


def test_failing_node_fails_run_and_keeps_saved_outputs(ray_local, tmp_path):
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 16}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "directory": str(tmp_path), "prefix": "kept"}},
             "3": {"class_type": "Fail", "inputs": {"message": "boom at step 3", "after": ["2", 0]}},
             "4": {"class_type": "Passthrough", "inputs": {"value": ["3", 0]}}}
    r = run_graph(graph, 2, check=False, measure_store=False, node_modules=[TESTING_NODES])
    assert r.status == "failed" and r.failed_node == "3"
    assert r.error == "node '3' (Fail) failed: RuntimeError: boom at step 3"
    assert (tmp_path / "kept_00.png").is_file()
    assert r.outputs["2"] == [[str(tmp_path / "kept_00.png")]]
    with pytest.raises(WorkflowError, match="node '3' \\(Fail\\) failed"):
        run_graph(graph, 0, measure_store=False, node_modules=[TESTING_NODES])


def test_level0_cache_reuses_unchanged_nodes(ray_local):
    ex = Executor(measure_store=False)
    try:
        g = scenario(1000, 2000)
        first = ex.run(g, 0, node_modules=[TESTING_NODES]).raise_for_status()
        again = ex.run(g, 0, node_modules=[TESTING_NODES]).raise_for_status()
        assert first.cached == [] and sorted(again.cached) == sorted(g) and again.executed == []
        g["5"]["inputs"]["seed"] = 9  # only node 5 and what depends on it run again
        changed = ex.run(g, 0, node_modules=[TESTING_NODES]).raise_for_status()
        assert sorted(changed.executed) == ["5", "6"] and sorted(changed.cached) == ["1", "2", "3", "4"]
        assert changed.outputs["6"] != first.outputs["6"] and changed.outputs["4"] == first.outputs["4"]
        assert ex.run(g, 2, node_modules=[TESTING_NODES]).cached == []  # levels 1/2 never reuse
    finally:
        ex.close()


def test_bad_release_level(ray_local):
    with pytest.raises(WorkflowError, match="release_level=3 is invalid"):
        run_graph(scenario(10, 10), 3, node_modules=[TESTING_NODES])


def test_testing_nodes_run_only_when_named(ray_local):
    """Without the module the graph fails before anything runs (one line naming --nodes); with it, it runs."""
    graph = {"1": {"class_type": "AllocateMemory", "inputs": {"bytes": 10, "seed": 1}},
             "2": {"class_type": "Checksum", "inputs": {"data": ["1", 0]}}}
    events: list[dict] = []
    with pytest.raises(ConfigError, match=f"unknown class_type 'AllocateMemory': .*pass --nodes {TESTING_NODES}"):
        run_graph(graph, 2, measure_store=False, on_event=events.append)
    assert events == []
    ex = Executor(measure_store=False)
    try:
        with pytest.raises(ConfigError, match="unknown class_type 'AllocateMemory'"):
            ex.run(graph, 2)
        assert ex.run(graph, 2, node_modules=[TESTING_NODES]).raise_for_status().outputs["2"]
    finally:
        ex.close()
