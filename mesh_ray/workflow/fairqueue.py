"""The dispatcher behind ``mesh-ray serve`` and the ComfyUI queue: fair queues of runs from many
clients, served round-robin, each run executed by the backend of its kind.

One queue per client; the dispatcher picks, among the clients whose next run can start now, the
one served longest ago, so a client with 100 queued runs never keeps another's run waiting for
more than one of its own.  What "can start now" means is the backend's: the graph backend
(``scheduler.GraphBackend``) runs at most ``max_parallel`` runs and one per client; the ComfyUI
backend (``comfy_pool.ComfyPool``) needs an idle worker that can run the prompt.  Each run keeps a
list of events (read with ``events(run_id, since, wait_s)``), a result, and a cancel flag that
the backend watches.  A backend that loses the worker running a run raises ``WorkerLost``: the
run goes back to the front of its client's queue, at most ``max_tries`` attempts in all.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from mesh_ray.cluster import metrics
from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.workflow.events import TERMINAL, event
from mesh_ray.workflow.executor import RunResult, WorkflowError

log = logging.getLogger("mesh_ray.workflow")

KEEP_ENDED = 2000  # ended runs remembered (their events and results); older ones are forgotten


class WorkerLost(ClusterError):
    """The worker that ran a run died: the run may run again on another."""


@dataclass
class Run:
    """One queued, running or ended run.  ``job`` is the backend's (a graph, a ComfyUI prompt)."""

    run_id: str
    client: str
    kind: str
    job: Any
    level: int = 0
    timeout_s: float = 3600.0
    state: str = "queued"  # queued | running | finished | failed | cancelled
    events: list[dict] = field(default_factory=list)
    result: dict | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.time)
    tries: int = 0  # attempts that lost their worker
    avoid: set[str] = field(default_factory=set)  # workers that died running it


class Backend(Protocol):
    """What executes runs of one kind."""

    kind: str
    per_client: int  # runs of one client executing at once
    max_tries: int  # attempts of a run whose worker died

    def acquire(self, run: Run) -> Any:
        """A slot to execute ``run`` now, or None (called with the queue's lock held: be quick)."""

    def execute(self, run: Run, slot: Any, emit: Callable[[dict], None]) -> RunResult:
        """Run it (in its own thread), sending events to ``emit``; stop soon after ``run.cancel`` is set."""

    def release(self, run: Run, slot: Any) -> None:
        """The run ended (or will be retried): the slot is free again."""

    def drop_client(self, client: str) -> None:
        """A client went away: free what is kept for it."""

    def close(self) -> None:
        """Stop everything this backend started."""


class FairQueue:
    """Queues, round-robin dispatch, events and cancel for runs of any backend (thread-safe)."""

    def __init__(self, backends: dict[str, Backend], keep_ended: int = KEEP_ENDED) -> None:
        self._backends = dict(backends)
        self._keep_ended = keep_ended
        self._runs: dict[str, Run] = {}
        self._ended: deque[str] = deque()
        self._queues: dict[str, deque[str]] = {}
        self._clients: list[str] = []  # in order of first submission
        self._served: dict[str, int] = {}  # client -> dispatch count when it was last served (round-robin)
        self._dispatched = 0
        self._running: dict[tuple[str, str], int] = {}  # (client, kind) -> runs executing
        self._gone: dict[str, str] = {}  # client -> why it was dropped (its runs are cancelled with that)
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name="mesh-ray-fair-queue", daemon=True)
        self._thread.start()

    # -- client API -------------------------------------------------------------------------------

    def backend(self, kind: str) -> Backend:
        try:
            return self._backends[kind]
        except KeyError:
            raise ConfigError(f"no backend for runs of kind {kind!r}: use one of {', '.join(self._backends)}") from None

    def enqueue(self, kind: str, job: Any, client_id: str, level: int = 0, timeout_s: float = 3600.0) -> str:
        """Queue a job the backend of ``kind`` has checked; returns its run id at once."""
        self.backend(kind)
        run = Run(uuid.uuid4().hex[:12], str(client_id), kind, job, level, timeout_s)
        with self._cv:
            if self._closed:
                raise WorkflowError("the workflow scheduler is shut down: start it again (`mesh-ray serve`)")
            self._runs[run.run_id] = run
            self._queues.setdefault(run.client, deque()).append(run.run_id)
            if run.client not in self._clients:
                self._clients.append(run.client)
            self._gone.pop(run.client, None)  # a client id that comes back is served again
            run.events.append(event(run.run_id, "run_queued", client=run.client,
                                    position=sum(len(q) for q in self._queues.values())))
            self._gauge()
            self._cv.notify_all()
        return run.run_id

    def emit(self, run_id: str, ev: dict) -> None:
        """Append an event (node tasks and backends send progress here)."""
        with self._cv:
            run = self._runs.get(run_id)
            if run is not None:
                run.events.append({"run_id": run_id, **ev})
                self._cv.notify_all()

    def events(self, run_id: str, since: int = 0, wait_s: float = 0.0) -> list[dict]:
        """Events of a run from index ``since`` on; with ``wait_s``, wait that long for a first new one."""
        end = time.monotonic() + max(0.0, wait_s)
        with self._cv:
            run = self._get(run_id)
            while len(run.events) <= since and not run.done.is_set() and (left := end - time.monotonic()) > 0:
                self._cv.wait(min(left, 1.0))
            return list(run.events[since:])

    def status(self, run_id: str) -> str:
        return self._get(run_id).state

    def result(self, run_id: str, timeout: float = 600.0) -> dict | None:
        """The run's result dict once it ended, or None if it has not ended within ``timeout`` s."""
        run = self._get(run_id)
        return run.result if run.done.wait(timeout) else None

    def cancel(self, run_id: str) -> bool:
        """Cancel a queued or running run; False when it had already ended."""
        with self._cv:
            run = self._get(run_id)
            if run.state == "queued":
                self._queues[run.client].remove(run_id)
                self._end(run, RunResult(run_id, "cancelled", run.level, error=f"run {run_id} was cancelled before it started"))
                self._gauge()
                return True
            if run.state == "running":
                run.cancel.set()
                return True
            return False

    def forget(self, run_id: str) -> bool:
        """Drop an ended run's events and result (its client has read them); False if it has not ended."""
        with self._cv:
            run = self._runs.get(run_id)
            if run is None or not run.done.is_set():
                return False
            del self._runs[run_id]
            return True

    def drop_client(self, client_id: str, reason: str) -> list[str]:
        """A client went away: cancel its queued and running runs, forget their outputs and free what
        the backends keep for it once its running runs have stopped.  Returns the ids of the runs it
        cancelled; other clients are not touched."""
        with self._cv:
            self._gone[client_id] = reason
            hit = []
            for run in self._runs.values():
                if run.client != client_id:
                    continue
                if run.state == "queued":
                    self._queues[run.client].remove(run.run_id)
                    self._end(run, RunResult(run.run_id, "cancelled", run.level, error=f"run {run.run_id} was cancelled: {reason}"))
                    hit.append(run.run_id)
                elif run.state == "running":
                    run.cancel.set()
                    hit.append(run.run_id)
                if run.state != "running" and run.result is not None:
                    run.result["outputs"] = {}
                    run.events = [e for e in run.events if e["type"] in TERMINAL]  # payloads (files) go too
            self._gauge()
        for backend in self._backends.values():
            backend.drop_client(client_id)
        log.info("client %s is gone (%s): cancelled %d runs", client_id, reason, len(hit))
        return hit

    def runs(self, client_id: str | None = None) -> list[dict]:
        with self._cv:
            return [{"run_id": r.run_id, "client": r.client, "kind": r.kind, "state": r.state, "release_level": r.level,
                     "submitted": r.submitted, "tries": r.tries} for r in self._runs.values()
                    if client_id in (None, r.client)]

    def poke(self) -> None:
        """A backend has room again (a worker appeared): look at the queues now."""
        with self._cv:
            self._cv.notify_all()

    def shutdown(self) -> None:
        """Cancel everything and stop the dispatcher and the backends."""
        with self._cv:
            self._closed = True
            for run in self._runs.values():
                run.cancel.set()
            self._cv.notify_all()
        for backend in self._backends.values():
            backend.close()

    # -- dispatch -----------------------------------------------------------------------------------

    def _get(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise ConfigError(f"no workflow run {run_id!r}: use a run id returned by submit()")
        return run

    def _next(self) -> tuple[Run, Any] | None:
        """The next run and its slot: of the clients whose next run can start now, the one served longest ago."""
        ready = [c for c in self._clients if self._queues.get(c)]
        for client in sorted(ready, key=lambda c: (self._served.get(c, -1), self._clients.index(c))):
            run = self._runs[self._queues[client][0]]
            backend = self._backends[run.kind]
            if self._running.get((client, run.kind), 0) >= backend.per_client:
                continue
            slot = backend.acquire(run)
            if slot is None:
                continue
            self._queues[client].popleft()
            self._dispatched += 1
            self._served[client] = self._dispatched
            return run, slot
        return None

    def _dispatch(self) -> None:
        while True:
            with self._cv:
                picked = None
                while not self._closed and (picked := self._next()) is None:
                    self._cv.wait(timeout=1.0)
                if self._closed:
                    if picked is not None:
                        self._backends[picked[0].kind].release(*picked)
                    return
                run, slot = picked
                run.state = "running"
                key = (run.client, run.kind)
                self._running[key] = self._running.get(key, 0) + 1
                self._gauge()
            threading.Thread(target=self._execute, args=(run, slot), name=f"mesh-ray-run-{run.run_id}", daemon=True).start()

    def _execute(self, run: Run, slot: Any) -> None:
        backend = self._backends[run.kind]
        lost = None
        try:
            result = backend.execute(run, slot, lambda ev: self.emit(run.run_id, ev))
        except WorkerLost as e:
            lost, result = str(e), None
        except Exception as e:  # noqa: BLE001 - a run must always end with a result
            log.exception("workflow run %s crashed", run.run_id)
            result = RunResult(run.run_id, "failed", run.level, error=f"run {run.run_id} failed: {type(e).__name__}: {e}")
        finally:
            backend.release(run, slot)
        with self._cv:
            key = (run.client, run.kind)
            self._running[key] -= 1
            reason = self._gone.get(run.client)
            if lost is not None:
                run.tries += 1
                if reason is None and not run.cancel.is_set() and not self._closed and run.tries < backend.max_tries:
                    run.state = "queued"
                    self._queues[run.client].appendleft(run.run_id)
                    run.events.append(event(run.run_id, "run_retry", attempt=run.tries + 1, message=lost))
                    self._gauge()
                    self._cv.notify_all()
                    return
                why = "was cancelled" if run.cancel.is_set() else f"lost its worker {run.tries} times"
                result = RunResult(run.run_id, "cancelled" if run.cancel.is_set() else "failed", run.level,
                                   error=f"run {run.run_id} {why}: {lost}")
            if reason is not None:  # nobody will read the outputs: do not keep them
                result.outputs = {}
                if result.status == "cancelled":
                    result.error = f"run {run.run_id} was cancelled: {reason}"
            self._end(run, result)
            self._gauge()
            self._cv.notify_all()

    def _gauge(self) -> None:
        """Queue depth and running runs to the metrics (lock held)."""
        metrics.service_runs(sum(len(q) for q in self._queues.values()), sum(self._running.values()))

    def _end(self, run: Run, result: RunResult) -> None:
        run.result = result.to_dict()
        run.state = result.status
        if not any(e["type"] in TERMINAL for e in run.events):
            kind = {"finished": "run_finished", "failed": "run_failed", "cancelled": "run_cancelled"}[result.status]
            run.events.append(event(run.run_id, kind, message=result.error))
        run.done.set()
        self._ended.append(run.run_id)
        while len(self._ended) > self._keep_ended:
            self._runs.pop(self._ended.popleft(), None)
        self._cv.notify_all()


__all__ = ["Backend", "FairQueue", "KEEP_ENDED", "Run", "WorkerLost"]
