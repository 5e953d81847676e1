"""Progress events of a run, and the relay actor that carries them out of node tasks.

An event is a plain dict: ``{"run_id", "type", "t", ...}`` with type one of ``run_queued``,
``run_started``, ``node_started``, ``node_cached``, ``node_finished``, ``node_rerun``,
``node_failed``, ``progress`` (``step`` of ``total``), ``run_finished``, ``run_failed``,
``run_cancelled``.  Node events carry ``node`` and ``class_type``.
"""

from __future__ import annotations

import time
from typing import Any

import ray

TERMINAL = ("run_finished", "run_failed", "run_cancelled")


def event(run_id: str, type_: str, **fields: Any) -> dict:
    """A timestamped event dict."""
    return {"run_id": run_id, "type": type_, "t": time.time(), **fields}


def describe(ev: dict) -> str:
    """One human line for an event (used by the CLI's log)."""
    kind = ev["type"]
    who = f"node {ev['node']} ({ev.get('class_type', '?')})" if "node" in ev else f"run {ev['run_id']}"
    if kind == "progress":
        return f"{who}: step {ev['step']} of {ev['total']}"
    if kind == "node_finished":
        return f"{who} finished in {ev.get('ms', 0):.0f} ms"
    extra = f": {ev['message']}" if ev.get("message") else ""
    return f"{who} {kind.split('_', 1)[-1]}{extra}"


@ray.remote(num_cpus=0)
class EventRelay:
    """Buffers events that node tasks send (``emit``) until the run's executor collects them (``drain``)."""

    def __init__(self) -> None:
        self._events: dict[str, list[dict]] = {}

    def emit(self, run_id: str, ev: dict) -> None:
        self._events.setdefault(run_id, []).append({"run_id": run_id, **ev})

    def drain(self, run_id: str) -> list[dict]:
        return self._events.pop(run_id, [])
