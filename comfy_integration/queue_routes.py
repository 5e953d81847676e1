"""HTTP routes of the ComfyUI queue on the mesh, added to a running ComfyUI (the frontend):

* ``POST /mesh/queue``: the body of ComfyUI's ``POST /prompt``; the prompt is validated here as
  ComfyUI does (a 400 with ``node_errors`` when it is bad, except for model names this ComfyUI
  lacks: the workers validate those against their own folders), then queued on the cluster.  The
  answer is ``/prompt``'s (``prompt_id``, ``number``, ``node_errors``), or a 503 whose error message
  says in one line why the cluster cannot take it (down, no token, ...).
* ``GET /mesh/queue/status``: state (idle | starting | up | down), a one-line message, the workers,
  the prompts in flight and the recent finished ones (with the worker that ran each).
* ``POST /interrupt`` and ``POST /queue {"delete": [...]}`` for a prompt queued on the mesh reach
  the worker running it (the UI's cancel button), through a middleware.

``/api/...`` twins come with ComfyUI's route table.  Importing this module outside a running
ComfyUI does nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

from .registry import add_routes_once

QUEUE_ROUTE = "/mesh/queue"
STATUS_ROUTE = "/mesh/queue/status"
TOLERATED = ("value_not_in_list",)  # a model only the workers have: they check it


def _error(kind: str, message: str, status: int, node_errors: dict | None = None) -> Any:
    from aiohttp import web

    return web.json_response({"error": {"type": kind, "message": message, "details": message, "extra_info": {}},
                              "node_errors": node_errors or {}}, status=status)


def only_missing_models(node_errors: dict) -> bool:
    """Whether every validation error is a value this ComfyUI does not list (e.g. a model it lacks)."""
    errs = [e for ne in node_errors.values() for e in ne.get("errors", [])]
    return bool(errs) and all(e.get("type") in TOLERATED for e in errs)


def register_routes() -> bool:
    """Add the routes and the middleware to the running ComfyUI (once); False without a server."""
    return add_routes_once("queue", _add_routes, needs="prompt_queue")


def _add_routes(srv: Any) -> None:
    import asyncio

    from aiohttp import web

    from .queue_bridge import QueueUnavailable, bridge

    @srv.routes.post(QUEUE_ROUTE)
    async def _queue(request: Any) -> Any:
        import execution

        json_data = srv.trigger_on_prompt(await request.json())
        prompt = json_data.get("prompt")
        if not isinstance(prompt, dict):
            return _error("no_prompt", "No prompt provided", 400)
        number = json_data.get("number")
        if number is None:
            number = srv.number
            srv.number += 1
        pid = str(json_data.get("prompt_id") or uuid.uuid4())
        srv.node_replace_manager.apply_replacements(prompt)
        valid = await execution.validate_prompt(pid, prompt, json_data.get("partial_execution_targets"))
        outputs = valid[2]
        if not valid[0]:
            if not only_missing_models(valid[3]):
                return web.json_response({"error": valid[1], "node_errors": valid[3]}, status=400)
            outputs = []  # the worker picks the outputs once it has validated the prompt
        extra = dict(json_data.get("extra_data") or {})
        sid = json_data.get("client_id") or extra.get("client_id")
        try:
            await asyncio.get_running_loop().run_in_executor(None, bridge().queue, pid, prompt, extra, outputs, sid,
                                                             number)
        except QueueUnavailable as e:
            return _error("mesh_unavailable", str(e), 503)
        return web.json_response({"prompt_id": pid, "number": number, "node_errors": {}})

    @srv.routes.get(STATUS_ROUTE)
    async def _status(request: Any) -> Any:
        return web.json_response(bridge().status())

    @web.middleware
    async def _cancel(request: Any, handler: Any) -> Any:
        """The UI's cancel (``/interrupt {prompt_id}``, ``/queue {delete}``) for prompts queued on the mesh."""
        if request.method == "POST" and request.path.removeprefix("/api") in ("/interrupt", "/queue"):
            b = bridge()
            if b.inflight:
                try:
                    body = await request.json()
                except ValueError:
                    body = {}
                ids = [body.get("prompt_id")] if request.path.endswith("/interrupt") else list(body.get("delete") or [])
                ours = [i for i in ids if i in b.inflight]
                for pid in ours:
                    b.interrupt(pid)
                if ours and len(ours) == len(ids):
                    return web.Response(status=200)
        return await handler(request)

    app = getattr(srv, "app", None)
    if app is not None and not app.frozen:
        app.middlewares.append(_cancel)


register_routes()

__all__ = ["QUEUE_ROUTE", "STATUS_ROUTE", "only_missing_models", "register_routes"]
