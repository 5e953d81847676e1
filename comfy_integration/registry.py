"""What the status light shows: the splits Mesh Split Model built, their health, and ``GET /mesh/status``.

The split node calls ``record_split(key, stages, address, plan, error)`` after each build (or
failed build; ``stages`` is its ``StageGroup``); ``status()`` asks every remote stage of every recorded split whether it is alive,
within a bounded timeout, and reports a light per split:

* ``green``: every remote stage answered;
* ``red``: the build failed, Ray is unreachable, or a stage died or did not answer in time;
* ``grey``: nothing built (no split yet, a closed split, or a split with no remote stage).

``key`` is the split node's id in the graph (ComfyUI's ``UNIQUE_ID``), so that the page
draws each light on its own node (``web/mesh_status.js``).  The route is added to ComfyUI's
``PromptServer`` only when one exists (a running ComfyUI); importing this module elsewhere does
nothing more than define the functions.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

STATUS_TIMEOUT_S = 2.0  # how long one status call waits for the stages to answer
ROUTE = "/mesh/status"


@dataclass
class _Entry:
    split: Any
    address: str
    plan: str
    error: str | None
    recorded: float


_lock = threading.Lock()
_entries: dict[str, _Entry] = {}
_address = ""


def record_split(key: str, split: Any, address: str, plan: str, error: str | None = None) -> None:
    """Remember what a split node built (``split``: its StageGroup; None with ``error`` when the build failed)."""
    global _address
    with _lock:
        _entries[str(key)] = _Entry(split, address, plan, error, time.time())
        _address = address


def forget_split(key: str) -> None:
    """Drop a node's entry (its light goes back to grey)."""
    with _lock:
        _entries.pop(str(key), None)


def _remote_segments(split: Any) -> list:
    return [s for s in getattr(split, "segments", []) if getattr(s, "actor", None) is not None]


def _probe(split: Any, timeout_s: float) -> tuple[str, str | None, list[dict]]:
    """(state, error, stages) of one split: ping every remote stage once, all within ``timeout_s``."""
    import ray

    segs = _remote_segments(split)
    if getattr(split, "closed", False) or not segs:
        return "grey", None, []
    if not ray.is_initialized():
        return "red", "Ray is not connected in this ComfyUI process: queue the workflow again to reconnect", []
    from .connection import node_alive

    if not node_alive():  # pinging through a dead node could end this process (Ray's rule): do not
        return "red", "the Ray cluster went away (this ComfyUI's Ray node is gone): queue again once it is back", []
    try:
        refs = [s.actor.ready.remote() for s in segs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - the cluster itself is gone
        return "red", f"Ray cluster unreachable ({type(e).__name__}): queue again once it is back", []
    ready_set = set(ready)
    stages, errors = [], []
    for seg, ref in zip(segs, refs):
        alive, why = False, f"did not answer within {timeout_s:g} s"
        if ref in ready_set:
            try:
                alive, why = bool(ray.get(ref, timeout=timeout_s)), None
            except Exception as e:  # noqa: BLE001 - RayActorError and friends: the stage died
                why = f"died ({type(e).__name__})"
        stages.append({"index": seg.index, "blocks": str(seg.range), "node": seg.node_id, "alive": alive})
        if not alive:
            errors.append(f"stage {seg.index} ({seg.range}) {why}")
    if errors:
        return "red", "; ".join(errors) + ": queue the workflow again to re-create the stages", stages
    return "green", None, stages


def status(timeout_s: float = STATUS_TIMEOUT_S) -> dict:
    """``{address, splits: [{key, plan, state, error, stages}]}`` with a light per recorded split."""
    with _lock:
        entries = dict(_entries)
        address = _address
    splits = []
    for key, e in entries.items():
        if e.error:
            state, error, stages = "red", e.error, []
        elif e.split is None:
            state, error, stages = "grey", None, []
        else:
            state, error, stages = _probe(e.split, timeout_s)
        splits.append({"key": key, "plan": e.plan, "address": e.address, "state": state, "error": error,
                       "stages": stages})
    return {"address": address, "splits": splits}


def prompt_server() -> Any:
    """The running ComfyUI's ``PromptServer`` instance, or None (a script, a test without a server)."""
    server = sys.modules.get("server")  # ComfyUI's own module, loaded only by a running ComfyUI
    return getattr(getattr(server, "PromptServer", None), "instance", None)


_servers_claimed: set[str] = set()


def add_routes_once(what: str, add: Callable[[Any], None], needs: str | None = None) -> bool:
    """Call ``add(server)`` with the running ComfyUI's PromptServer the first time ``what`` asks (routes
    are added once per process); False without a server, or one lacking attribute ``needs``."""
    instance = prompt_server()
    if instance is None or (needs is not None and not hasattr(instance, needs)):
        return False
    with _lock:
        first = what not in _servers_claimed
        _servers_claimed.add(what)
    if first:
        add(instance)
    return True


def register_routes() -> bool:
    """Add ``GET /mesh/status`` to the running ComfyUI's PromptServer (once); False without a server."""
    return add_routes_once("status", _add_status_route)


def _add_status_route(instance: Any) -> None:
    from aiohttp import web

    @instance.routes.get(ROUTE)
    async def _mesh_status(request: Any) -> Any:
        import asyncio

        # The stage pings block for up to STATUS_TIMEOUT_S: keep them off the server's event loop.
        data = await asyncio.get_running_loop().run_in_executor(None, status)
        return web.json_response(data)


register_routes()

__all__ = ["ROUTE", "STATUS_TIMEOUT_S", "add_routes_once", "forget_split", "prompt_server", "record_split", "register_routes", "status"]
