"""Fair scheduling of runs from many clients: one queue per client, served round-robin.

A client's runs execute one after another (so each client's level-0 cache stays its own); at most
``max_parallel`` runs execute at once across clients, and a client with a long queue never keeps
another client's run waiting for more than one of its own runs.  Used in-process (embedded) and
inside the workflow service actor.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mesh_ray.cluster import metrics
from mesh_ray.errors import ConfigError
from mesh_ray.workflow.events import TERMINAL, event
from mesh_ray.workflow.executor import LEVELS, Executor, RunResult, WorkflowError
from mesh_ray.workflow.graph import Graph, validate_graph

log = logging.getLogger("mesh_ray.workflow")


@dataclass
class _Rec:
    run_id: str
    client: str
    graph: Graph
    level: int
    timeout_s: float
    base_dir: str | None
    outputs: list[str] | None
    state: str = "queued"  # queued | running | finished | failed | cancelled
    events: list[dict] = field(default_factory=list)
    result: dict | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.time)


class Scheduler:
    """Queues, round-robin dispatch, events and cancel for workflow runs (thread-safe)."""

    def __init__(self, sink: Any = None, max_parallel: int = 2, measure_store: bool = True,
                 node_module_prefixes: list[str] | None = None) -> None:
        """``node_module_prefixes``: the allow-list for node modules (None: this process's setting)."""
        if max_parallel < 1:
            raise ConfigError(f"max_parallel={max_parallel} is invalid: use at least 1 concurrent run")
        self._sink, self.max_parallel, self._measure = sink, max_parallel, measure_store
        self.node_module_prefixes = node_module_prefixes
        self._runs: dict[str, _Rec] = {}
        self._queues: dict[str, deque[str]] = {}
        self._clients: list[str] = []  # in order of first submission
        self._served: dict[str, int] = {}  # client -> dispatch count when it was last served (round-robin)
        self._dispatched = 0
        self._busy: set[str] = set()  # clients with a run executing
        self._executors: dict[str, Executor] = {}
        self._gone: dict[str, str] = {}  # client -> why it was dropped (its runs are cancelled with that)
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name="mesh-ray-workflow-dispatch", daemon=True)
        self._thread.start()

    # -- client API -------------------------------------------------------------------------------

    def submit(self, graph: dict | Graph, client_id: str = "default", release_level: int = 0, timeout_s: float = 3600.0,
               base_dir: str | None = None, outputs: list[str] | None = None, node_modules: list[str] | None = None) -> str:
        """Validate (importing ``node_modules`` here) and queue a graph; returns its run id at once."""
        if release_level not in LEVELS:
            raise ConfigError(f"release_level={release_level!r} is invalid: use 0, 1 or 2")
        g = validate_graph(graph, modules=node_modules or (), prefixes=self.node_module_prefixes)
        rec = _Rec(uuid.uuid4().hex[:12], str(client_id), g, release_level, timeout_s, base_dir, outputs)
        with self._cv:
            if self._closed:
                raise WorkflowError("the workflow scheduler is shut down: start it again (`mesh-ray serve`)")
            self._runs[rec.run_id] = rec
            self._queues.setdefault(rec.client, deque()).append(rec.run_id)
            if rec.client not in self._clients:
                self._clients.append(rec.client)
            self._gone.pop(rec.client, None)  # a client id that comes back is served again
            rec.events.append(event(rec.run_id, "run_queued", client=rec.client,
                                    position=sum(len(q) for q in self._queues.values())))
            self._gauge()
            self._cv.notify_all()
        return rec.run_id

    def emit(self, run_id: str, ev: dict) -> None:
        """Append an event (node tasks send progress here through the service actor)."""
        with self._cv:
            rec = self._runs.get(run_id)
            if rec is not None:
                rec.events.append({"run_id": run_id, **ev})

    def events(self, run_id: str, since: int = 0) -> list[dict]:
        """Events of a run from index ``since`` on."""
        return list(self._get(run_id).events[since:])

    def status(self, run_id: str) -> str:
        return self._get(run_id).state

    def result(self, run_id: str, timeout: float = 600.0) -> dict | None:
        """The run's result dict once it ended, or None if it has not ended within ``timeout`` s."""
        rec = self._get(run_id)
        return rec.result if rec.done.wait(timeout) else None

    def cancel(self, run_id: str) -> bool:
        """Cancel a queued or running run; False when it had already ended."""
        with self._cv:
            rec = self._get(run_id)
            if rec.state == "queued":
                self._queues[rec.client].remove(run_id)
                self._end(rec, RunResult(run_id, "cancelled", rec.level, error=f"run {run_id} was cancelled before it started"))
                self._gauge()
                return True
            if rec.state == "running":
                rec.cancel.set()
                return True
            return False

    def drop_client(self, client_id: str, reason: str) -> list[str]:
        """A client went away: cancel its queued and running runs, forget their outputs and free what its
        executor keeps (cached outputs, node host actors) once its running run has stopped.  Returns the
        ids of the runs it cancelled; other clients are not touched."""
        with self._cv:
            self._gone[client_id] = reason
            hit = []
            for rec in self._runs.values():
                if rec.client != client_id:
                    continue
                if rec.state == "queued":
                    self._queues[rec.client].remove(rec.run_id)
                    self._end(rec, RunResult(rec.run_id, "cancelled", rec.level, error=f"run {rec.run_id} was cancelled: {reason}"))
                    hit.append(rec.run_id)
                elif rec.state == "running":
                    rec.cancel.set()
                    hit.append(rec.run_id)
                if rec.state != "running" and rec.result is not None:
                    rec.result["outputs"] = {}
            ex = None if client_id in self._busy else self._executors.pop(client_id, None)
            self._gauge()
        if ex is not None:
            ex.close()
        log.info("client %s is gone (%s): cancelled %d runs", client_id, reason, len(hit))
        return hit

    def clients(self) -> list[str]:
        """Clients that have an executor (a cache) here now."""
        with self._cv:
            return list(self._executors)

    def runs(self, client_id: str | None = None) -> list[dict]:
        with self._cv:
            return [{"run_id": r.run_id, "client": r.client, "state": r.state, "release_level": r.level,
                     "submitted": r.submitted} for r in self._runs.values() if client_id in (None, r.client)]

    def shutdown(self) -> None:
        """Cancel everything and stop the dispatcher; cached node hosts are stopped."""
        with self._cv:
            self._closed = True
            for rec in self._runs.values():
                rec.cancel.set()
            self._cv.notify_all()
        for ex in self._executors.values():
            ex.close()

    # -- dispatch -----------------------------------------------------------------------------------

    def _get(self, run_id: str) -> _Rec:
        rec = self._runs.get(run_id)
        if rec is None:
            raise ConfigError(f"no workflow run {run_id!r}: use a run id returned by submit()")
        return rec

    def _next(self) -> _Rec | None:
        """The next run: of the clients with a queued run and none executing, the one served longest ago."""
        if len(self._busy) >= self.max_parallel:
            return None
        ready = [c for c in self._clients if c not in self._busy and self._queues.get(c)]
        if not ready:
            return None
        client = min(ready, key=lambda c: (self._served.get(c, -1), self._clients.index(c)))
        self._dispatched += 1
        self._served[client] = self._dispatched
        return self._runs[self._queues[client].popleft()]

    def _dispatch(self) -> None:
        while True:
            with self._cv:
                rec = None
                while not self._closed and (rec := self._next()) is None:
                    self._cv.wait(timeout=1.0)
                if self._closed:
                    return
                rec.state = "running"
                self._busy.add(rec.client)
                self._gauge()
            threading.Thread(target=self._execute, args=(rec,), name=f"mesh-ray-run-{rec.run_id}", daemon=True).start()

    def _execute(self, rec: _Rec) -> None:
        try:
            ex = self._executors.setdefault(rec.client, Executor(self._sink, self._measure))
            result = ex.run(rec.graph, rec.level, run_id=rec.run_id, on_event=lambda ev: self.emit(rec.run_id, ev),
                            cancel=rec.cancel, timeout_s=rec.timeout_s, base_dir=rec.base_dir, outputs=rec.outputs)
        except Exception as e:  # noqa: BLE001 - a run must always end with a result
            log.exception("workflow run %s crashed", rec.run_id)
            result = RunResult(rec.run_id, "failed", rec.level, error=f"run {rec.run_id} failed: {type(e).__name__}: {e}")
        with self._cv:
            reason = self._gone.get(rec.client)
            if reason is not None:  # nobody will read the outputs: do not keep them
                result.outputs = {}
                if result.status == "cancelled":
                    result.error = f"run {rec.run_id} was cancelled: {reason}"
            self._end(rec, result)
            self._busy.discard(rec.client)
            ex = self._executors.pop(rec.client, None) if reason is not None else None
            self._gauge()
            self._cv.notify_all()
        if ex is not None:  # the client left while this run ran: free its cache and hosts now
            ex.close()

    def _gauge(self) -> None:
        """Queue depth and running runs to the metrics (lock held)."""
        metrics.service_runs(sum(len(q) for q in self._queues.values()), len(self._busy))

    def _end(self, rec: _Rec, result: RunResult) -> None:
        rec.result = result.to_dict()
        rec.state = result.status
        if not any(e["type"] in TERMINAL for e in rec.events):
            kind = {"finished": "run_finished", "failed": "run_failed", "cancelled": "run_cancelled"}[result.status]
            rec.events.append(event(rec.run_id, kind, message=result.error))
        rec.done.set()
