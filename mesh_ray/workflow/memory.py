"""Memory of a run: bytes held by live outputs (exact bookkeeping) and the object store's usage (sampled)."""

from __future__ import annotations

from typing import Any

import ray

from mesh_ray.workflow.graph import Graph, Link


def store_bytes_used() -> int | None:
    """Bytes in use in the object stores of the cluster now, or None when Ray cannot tell."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - an internal API: measuring must never break a run
        return None


class LiveSet:
    """Outputs alive now and their sizes; remembers the peak of their sum and of the store usage."""

    def __init__(self, measure_store: bool = True) -> None:
        self.sizes: dict[Link, int] = {}
        self.peak = 0
        self.measure_store = measure_store
        self.store_base = store_bytes_used() if measure_store else None
        self.peak_store: int | None = None

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def add(self, link: Link, size: int) -> None:
        self.sizes[link] = size
        self.peak = max(self.peak, self.bytes)

    def drop(self, link: Link) -> None:
        self.sizes.pop(link, None)

    def sample_store(self) -> None:
        """Record the store usage above what it was when the run started."""
        if not self.measure_store:
            return
        used = store_bytes_used()
        if used is not None:
            used = max(0, used - (self.store_base or 0))
            self.peak_store = max(self.peak_store or 0, used)


def min_live_bytes(graph: Graph, sizes: dict[str, list[int]]) -> int:
    """The least memory any schedule of ``graph`` needs: while a node runs, its inputs and, when it
    ends, its outputs are alive together, so no schedule can peak below the largest such sum."""
    best = 0
    for nid in graph.nodes:
        inputs: set[Link] = set(graph.links(nid).values())
        total = sum(sizes.get(src, [0] * (k + 1))[k] for src, k in inputs) + sum(sizes.get(nid, []))
        best = max(best, total)
    return best


def fmt_bytes(n: Any) -> str:
    """1234567 -> '1.2 MB'."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
