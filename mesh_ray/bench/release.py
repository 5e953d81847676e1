"""``mesh-ray bench release``: peak memory of the release PR's scenario at levels 0, 1 and 2, next to
the graph's minimum possible live set.

Scenario: two large loader outputs used only by early nodes, then an allocation-heavy node.  Goal:
level 2 peaks within 5% of the minimum live set and at least 40% below level 0; outputs are the
same at every level.
"""

from __future__ import annotations

import os
import time
from typing import Any

from mesh_ray.tables import text_table
from mesh_ray.bench.goals import RELEASE as G
from mesh_ray.workflow.graph import validate_graph
from mesh_ray.workflow.memory import fmt_bytes, min_live_bytes, store_bytes_used
from mesh_ray.workflow.modules import TESTING_NODES

# Ray frees released objects in batches, once a second by default; a short period makes the sampled
# store peak follow the releases (only takes effect when this process starts Ray).
FREE_PERIOD_ENV = "RAY_free_objects_period_milliseconds"


def _settle(floor: int | None, timeout_s: float = 5.0) -> None:
    """Wait until objects of the previous level have left the store (so its peak is not counted twice)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        used = store_bytes_used()
        if used is None or floor is None or used <= floor + 1_000_000:
            return
        time.sleep(0.1)


def scenario(loader_bytes: int = 96_000_000, heavy_bytes: int = 192_000_000) -> dict:
    """The benchmark graph in API format (also in examples/release_scenario.json with the defaults); its node
    types are the testing ones (``node_modules=[TESTING_NODES]``)."""
    return {
        "1": {"class_type": "AllocateMemory", "inputs": {"bytes": loader_bytes, "seed": 1}},
        "2": {"class_type": "AllocateMemory", "inputs": {"bytes": loader_bytes, "seed": 2}},
        "3": {"class_type": "Checksum", "inputs": {"data": ["1", 0]}},
        "4": {"class_type": "Checksum", "inputs": {"data": ["2", 0], "extra": ["3", 0]}},
        "5": {"class_type": "AllocateMemory", "inputs": {"bytes": heavy_bytes, "seed": 3, "after": ["4", 0]}},
        "6": {"class_type": "Checksum", "inputs": {"data": ["5", 0], "extra": ["4", 0]}},
    }


def run_release_bench(loader_bytes: int = 96_000_000, heavy_bytes: int = 192_000_000, address: str | None = None,
                      measure_store: bool = True) -> dict[str, Any]:
    """Run the scenario once per level (each on a fresh executor) and compare the peaks."""
    from mesh_ray.workflow.service import connect_ray, run_graph

    os.environ.setdefault(FREE_PERIOD_ENV, "20")
    connect_ray(address)
    floor = store_bytes_used()
    graph = validate_graph(scenario(loader_bytes, heavy_bytes), modules=[TESTING_NODES])
    levels: dict[str, dict] = {}
    sizes: dict[str, list[int]] = {}
    for level in (0, 1, 2):
        _settle(floor)
        r = run_graph(graph, level, measure_store=measure_store)
        sizes = sizes or r.sizes
        levels[str(level)] = {"peak_bytes": r.peak_live_bytes, "peak_store_bytes": r.peak_store_bytes,
                              "seconds": r.seconds, "outputs": r.outputs, "reexecuted": r.reexecuted}
    min_live = min_live_bytes(graph, sizes)
    p0, p2 = levels["0"]["peak_bytes"], levels["2"]["peak_bytes"]
    same = all(levels[k]["outputs"] == levels["0"]["outputs"] for k in levels)
    over = p2 / min_live - 1 if min_live else 0.0
    below = 1 - p2 / p0 if p0 else 0.0
    return {"levels": levels, "min_live_bytes": min_live, "loader_bytes": loader_bytes, "heavy_bytes": heavy_bytes,
            "level2_over_min_live": round(over, 4), "level2_below_level0": round(below, 4),
            "outputs_identical": same, "goal_met": bool(same and over <= G["level2_over_min_live"] and below >= G["level2_below_level0"])}


def format_table(result: dict) -> str:
    """Levels side by side: peak live bytes, sampled object-store peak, ratio to the minimum live set."""
    lv, m = result["levels"], result["min_live_bytes"]
    rows = []
    for k in ("0", "1", "2"):
        r = lv[k]
        rows.append([k, fmt_bytes(r["peak_bytes"]), fmt_bytes(r["peak_store_bytes"]),
                     f"{r['peak_bytes'] / m:.3f}" if m else "-", f"{r['seconds']:.2f}", str(len(r["reexecuted"]))])
    lines = [f"release bench: 2 loaders x {fmt_bytes(result['loader_bytes'])}, heavy node {fmt_bytes(result['heavy_bytes'])}; "
             f"minimum live set {fmt_bytes(m)}"]
    lines.append(text_table(["level", "peak_live", "peak_store", "x_min_live", "seconds", "re-executed"], rows))
    lines.append(f"level 2: {result['level2_over_min_live'] * 100:+.1f}% vs minimum live set (goal <= +{G['level2_over_min_live']:.0%}), "
                 f"{result['level2_below_level0'] * 100:.1f}% below level 0 (goal >= {G['level2_below_level0']:.0%}); outputs identical: "
                 f"{result['outputs_identical']}; goal met: {result['goal_met']}")
    return "\n".join(lines)
