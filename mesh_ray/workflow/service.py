"""Many clients: the named, detached workflow service (``mesh-ray serve``) and the client API, which is
the same whether it talks to that service or runs embedded in the calling process.

    wf = Workflows.connect("auto")               # the service if one runs on the cluster, else embedded
    run = wf.submit(graph, release_level=2)      # a RunHandle with a run id
    for ev in run.follow(timeout=600): ...       # node started / finished, sampler step k of n
    result = run.result(timeout=600)             # RunResult: outputs, peaks, re-executed nodes
    run.cancel()

The same service queues ComfyUI prompts for the cluster's ComfyUI workers (``submit_comfy``,
``comfy_pool.ComfyPool``), served round-robin with the graphs.

Faults: a client whose driver goes away (exits, crashes, loses its node) has its queued and
running runs cancelled and its cached outputs and node hosts freed within a few seconds; other
clients are not touched.  When the service itself is restarted under a connected client, the
client's next call finds the new service, attaches again and submits again every run of its
that had not ended (its handles follow the new runs: nothing is lost); with no service running
the call fails in one line, never waits forever.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import ray

from mesh_ray.cluster.connect import ray_address
from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.names import MESH_NAMESPACE
from mesh_ray.cluster.ray_errors import ray_get
from mesh_ray.workflow.events import TERMINAL
from mesh_ray.workflow.executor import Executor, RunResult, WorkflowError
from mesh_ray.workflow.graph import Graph, load_graph, read_graph, validate_graph
from mesh_ray.workflow.leases import LEASE_CHECK_S, ClientLeases, new_lease
from mesh_ray.workflow.modules import allowed_prefixes
from mesh_ray.workflow.scheduler import Scheduler

log = logging.getLogger("mesh_ray.workflow")

SERVICE_NAME = "mesh-ray/workflow-service"
SERVICE_NAMESPACE = MESH_NAMESPACE
CALL_TIMEOUT_S = 60.0
EVENTS_WAIT_S = 5.0  # how long a client's events call waits for a new event at most (long poll)


@ray.remote(num_cpus=0, max_concurrency=128)
class WorkflowService:
    """The shared workflow service: a Scheduler in a detached actor; node tasks send progress to ``emit``."""

    def __init__(self, max_parallel: int = 2, node_module_prefixes: list[str] | None = None) -> None:
        me = ray.get_runtime_context().current_actor
        self._s = Scheduler(sink=me, max_parallel=max_parallel, node_module_prefixes=node_module_prefixes, owner=me)
        self._started = time.time()
        self._leases = ClientLeases()
        self._dropped: list[str] = []
        self._stop = threading.Event()
        threading.Thread(target=self._watch_clients, name="mesh-ray-client-leases", daemon=True).start()

    def _watch_clients(self) -> None:
        """Drop the clients whose driver died: their runs are cancelled, what they keep is freed."""
        while not self._stop.wait(LEASE_CHECK_S):
            try:
                for client in self._leases.gone():
                    self._s.drop_client(client, f"its client {client} disconnected")
                    self._dropped.append(client)
            except Exception as e:  # noqa: BLE001 - the watcher must outlive any one failure
                log.warning("client lease check failed: %s", e)

    def attach(self, client_id: str, box: list) -> str:
        """Register a client's lease (``leases.new_lease``) so that its runs end when it goes away;
        returns this service's actor id (a client tells a restarted service by it)."""
        self._leases.attach(client_id, box)
        return self._actor_id()

    def submit(self, graph: dict, client_id: str, release_level: int, timeout_s: float, base_dir: str | None,
               outputs: list[str] | None, node_modules: list[str] | None = None) -> str:
        """Validate here, importing the named node modules by name (this service's allow-list), and queue."""
        if not isinstance(graph, dict) or not all(isinstance(m, str) for m in node_modules or ()):
            raise ConfigError("the workflow service takes a graph as a JSON object and node modules as names: "
                              "submit through Workflows.submit")
        return self._s.submit(graph, client_id, release_level, timeout_s, base_dir, outputs, node_modules)

    def submit_comfy(self, payload: dict, client_id: str, timeout_s: float = 3600.0) -> str:
        """Queue a ComfyUI prompt for the ComfyUI workers (``comfy_jobs`` describes the payload)."""
        return self._s.submit_comfy(payload, client_id, timeout_s)

    def comfy_cached(self, digests: list[str]) -> list[str]:
        """The model digests every ComfyUI worker's node already caches."""
        return self._s.comfy.cached(digests)

    def comfy_workers(self) -> list[dict]:
        return self._s.comfy.workers()

    def comfy_pause(self, name: str, paused: bool = True) -> list[str]:
        """Drain a ComfyUI worker (no new prompts) or give it prompts again."""
        return self._s.comfy.pause(name, paused)

    def emit(self, run_id: str, ev: dict) -> None:
        self._s.emit(run_id, ev)

    def events(self, run_id: str, since: int = 0, wait_s: float = 0.0) -> list[dict]:
        return self._s.events(run_id, since, min(wait_s, EVENTS_WAIT_S))

    def forget(self, run_id: str) -> bool:
        return self._s.forget(run_id)

    def status(self, run_id: str) -> str:
        return self._s.status(run_id)

    def result(self, run_id: str, timeout: float) -> dict | None:
        return self._s.result(run_id, timeout)

    def cancel(self, run_id: str) -> bool:
        return self._s.cancel(run_id)

    def runs(self, client_id: str | None = None) -> list[dict]:
        return self._s.runs(client_id)

    def info(self) -> dict:
        """What ``mesh-ray status`` shows for this actor."""
        runs = self._s.runs()
        return {"kind": "workflow-service", "pid": os.getpid(), "uptime_s": round(time.time() - self._started, 1),
                "runs": len(runs), "running": sum(r["state"] == "running" for r in runs),
                "queued": sum(r["state"] == "queued" for r in runs), "clients": self._leases.clients(),
                "caches": self._s.clients(), "dropped": list(self._dropped), "actor_id": self._actor_id(),
                "node_module_prefixes": list(self._s.node_module_prefixes or ()),
                "comfy_workers": len(self._s.comfy.workers(discover=False))}

    @staticmethod
    def _actor_id() -> str:
        return ray.get_runtime_context().get_actor_id()

    def shutdown(self) -> None:
        self._stop.set()
        self._s.shutdown()


class ServiceGone(ClusterError):
    """The workflow service actor this client talked to is dead."""


def service_call(handle: Any, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
    """A service call with a timeout; Ray failures become one-line errors."""
    return ray_get(getattr(handle, method).remote(*args), timeout, f"the workflow service call {method}",
                   timeout_fix="check it with `mesh-ray status` or restart it with `mesh-ray serve`",
                   died_fix="start it again with `mesh-ray serve`", failed_fix="see the service log",
                   failed_error=WorkflowError, died_error=ServiceGone, keep=(ConfigError, WorkflowError))


def connect_ray(address: str | None = None) -> None:
    """``mesh_ray.connect``; an embedded Ray gets at least 4 logical CPUs, since most nodes are light."""
    from mesh_ray.mesh import connect

    embedded = ray_address(address) is None
    connect(address, **({"num_cpus": max(os.cpu_count() or 1, 4)} if embedded else {}))


def find_service() -> Any:
    """The running workflow service's handle, or None (Ray must be connected)."""
    try:
        return ray.get_actor(SERVICE_NAME, namespace=SERVICE_NAMESPACE)
    except ValueError:
        return None


def serve(max_parallel: int = 2, timeout_s: float = 60.0) -> dict:
    """Start the detached workflow service on the connected cluster (or find the running one); returns its info.
    A new service takes this process's node-module allow-list (``MESH_RAY_NODE_MODULE_PREFIXES``)."""
    handle = WorkflowService.options(name=SERVICE_NAME, namespace=SERVICE_NAMESPACE, lifetime="detached",
                                     get_if_exists=True).remote(max_parallel, list(allowed_prefixes()))
    return service_call(handle, "info", timeout=timeout_s)


def stop_service(timeout_s: float = 30.0) -> bool:
    """Cancel the service's runs and stop it; False when none was running."""
    handle = find_service()
    if handle is None:
        return False
    try:
        service_call(handle, "shutdown", timeout=timeout_s)
    finally:
        ray.kill(handle)
    return True


class RunHandle:
    """One submitted run: its id, events, result and cancel.  When the service restarts under it, the
    client submits it again and the handle follows the new run (``run_id`` changes; ``events()``
    then starts with a ``run_resubmitted`` event and the new run's events)."""

    def __init__(self, wf: "Workflows", run_id: str, method: str = "submit", args: tuple = ()) -> None:
        self.wf, self.run_id = wf, run_id
        self._method, self._args = method, args  # how it was submitted: to submit it again
        self._seen = 0
        self._notes: list[dict] = []
        self.ended = False

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id})"

    def _call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        return self.wf._run_call(self, method, *args, timeout=timeout)

    def _resubmitted(self, run_id: str, why: str) -> None:
        self._notes.append({"run_id": run_id, "type": "run_resubmitted", "t": time.time(), "previous": self.run_id,
                            "message": why})
        self.run_id, self._seen = run_id, 0

    def events(self, wait_s: float = 0.0) -> list[dict]:
        """Events since the last call (node started / finished, progress step k of n, run end); with
        ``wait_s``, wait up to that long (at most a few seconds) for the first new one."""
        new = self._call("events", self._seen, wait_s, timeout=CALL_TIMEOUT_S + wait_s)
        self._seen += len(new)
        notes, self._notes = self._notes, []
        if any(ev["type"] in TERMINAL for ev in new):
            self._ended()
        return notes + new

    def seek(self, index: int) -> None:
        """Read the run's events from ``index`` on at the next ``events()``."""
        self._seen = index

    def status(self) -> str:
        """queued | running | finished | failed | cancelled."""
        return self._call("status")

    def cancel(self) -> bool:
        """Stop the run (nodes still running are cancelled); False if it had already ended."""
        return self._call("cancel")

    def forget(self) -> None:
        """Tell the service it may drop this ended run's events and result (their files too)."""
        if self.wf.remote:
            self.wf._do("forget", self.run_id)
        self._ended()

    def _ended(self) -> None:
        self.ended = True
        self.wf._open.pop(id(self), None)

    def result(self, timeout: float = 600.0) -> RunResult:
        """Wait up to ``timeout`` s for the run to end and return its RunResult (any status)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            d = self._call("result", max(0.0, min(left, 10.0)), timeout=min(left, 10.0) + CALL_TIMEOUT_S)
            if d is not None:
                self._ended()
                return RunResult(**d)
            if time.monotonic() >= end:
                raise WorkflowError(f"run {self.run_id} did not finish within {timeout:g} s: wait longer "
                                    f"(result(timeout=...)) or cancel it")

    def wait(self, timeout: float = 3600.0, on_event: Callable[[dict], None] | None = None,
             check: bool = True) -> RunResult:
        """Follow the run to its end (``timeout`` s of run time), passing every event to ``on_event``; returns
        its RunResult, and with ``check`` a failed run raises WorkflowError."""
        for ev in self.follow(timeout=timeout + 60):
            if on_event is not None:
                on_event(ev)
        result = self.result(timeout=60)
        return result.raise_for_status() if check else result

    def follow(self, timeout: float = 3600.0, poll_s: float = 0.1) -> Iterator[dict]:
        """Yield events as they come until the run ends (or ``timeout`` s pass)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            new = self.events(wait_s=min(EVENTS_WAIT_S, max(0.0, end - time.monotonic())) if self.wf.remote else 0.0)
            yield from new
            if any(ev["type"] in TERMINAL for ev in new):
                return
            if not self.wf.remote:
                time.sleep(poll_s)
        raise WorkflowError(f"run {self.run_id} did not finish within {timeout:g} s: wait longer or cancel it")


class Workflows:
    """Client of workflow runs: through the shared service (``remote``) or an in-process scheduler."""

    def __init__(self, backend: Any, remote: bool, client_id: str | None = None) -> None:
        self._backend, self.remote = backend, remote
        self.client_id = client_id or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:4]}"
        self._open: dict[int, RunHandle] = {}  # runs submitted here that have not ended (submitted again on restart)
        self._lock = threading.RLock()
        if remote:
            self._lease = new_lease(self.client_id)  # this driver owns it: the service sees when we go
            self._service_id = service_call(backend, "attach", self.client_id, self._lease)

    @classmethod
    def connect(cls, address: str | None = None, service: bool | None = None, client_id: str | None = None,
                max_parallel: int = 2) -> "Workflows":
        """Join Ray (``mesh_ray.connect``); use the running service unless ``service=False``, else run embedded.
        ``service=True`` fails when no service runs."""
        connect_ray(address)
        handle = find_service() if service is not False else None
        if handle is not None:
            return cls(handle, True, client_id)
        if service:
            raise ClusterError("no workflow service runs on this cluster: start it with `mesh-ray serve`")
        return cls(Scheduler(max_parallel=max_parallel), False, client_id)

    def _do(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        if not self.remote:
            return getattr(self._backend, method)(*args)
        try:
            return service_call(self._backend, method, *args, timeout=timeout)
        except ServiceGone:
            self._reconnect()
        if method in ("submit", "submit_comfy", "runs", "comfy_cached", "comfy_workers", "comfy_pause"):
            return service_call(self._backend, method, *args, timeout=timeout)
        raise WorkflowError(f"run {args[0]} was lost when the workflow service restarted: submit it again")

    def _run_call(self, handle: RunHandle, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """A call about one run; after a service restart the run is submitted again and the call repeated."""
        if not self.remote:
            return getattr(self._backend, method)(handle.run_id, *args)
        try:
            return service_call(self._backend, method, handle.run_id, *args, timeout=timeout)
        except ServiceGone:
            self._reconnect()
        if handle.ended:
            raise WorkflowError(f"run {handle.run_id} had ended when the workflow service restarted, and its "
                                f"result went with it: submit it again")
        if method == "events":
            args = (0, *args[1:])
        return service_call(self._backend, method, handle.run_id, *args, timeout=timeout)

    def _reconnect(self) -> None:
        """The service died: use the one running now (started again with `mesh-ray serve`) and submit the
        runs of this client that had not ended again, or fail in one line."""
        with self._lock:
            gone = ServiceGone("the workflow service died and none runs now: start it again with `mesh-ray serve`, "
                               "then submit your runs again")
            handle = find_service()
            if handle is None:
                raise gone
            if handle._actor_id.hex() == self._service_id:
                return  # another thread of this client reconnected already
            try:
                service_id = service_call(handle, "attach", self.client_id, self._lease)
            except ServiceGone:
                raise gone from None
            if service_id == self._service_id:
                raise gone
            log.warning("the workflow service was restarted: client %s attached to the new one", self.client_id)
            self._backend, self._service_id = handle, service_id
            for run in list(self._open.values()):
                new_id = service_call(handle, run._method, *run._args)
                run._resubmitted(new_id, f"the workflow service restarted: run {run.run_id} submitted again as {new_id}")

    def _track(self, run_id: str, method: str, args: tuple) -> RunHandle:
        handle = RunHandle(self, run_id, method, args)
        with self._lock:
            self._open[id(handle)] = handle
        return handle

    def submit(self, graph: Graph | dict | str | os.PathLike, release_level: int = 0, timeout_s: float = 3600.0,
               outputs: list[str] | None = None, node_modules: list[str] | None = None) -> RunHandle:
        """Queue a run and return its handle.  The graph is validated where it runs (the service, or this
        process when embedded), with the types of ``node_modules`` (imported there by name; a Graph adds
        its own): a bad graph fails here in one line, before anything runs."""
        modules = [node_modules] if isinstance(node_modules, str) else list(node_modules or ())
        if isinstance(graph, Graph):
            data, modules = graph.to_json(), [*graph.modules, *modules]
        else:
            data = read_graph(graph) if isinstance(graph, (str, os.PathLike)) else graph
        args = (data, self.client_id, release_level, timeout_s, os.getcwd(), outputs, list(dict.fromkeys(modules)))
        return self._track(self._do("submit", *args), "submit", args)

    def submit_comfy(self, payload: dict, timeout_s: float = 3600.0) -> RunHandle:
        """Queue a ComfyUI prompt for the cluster's ComfyUI workers (payload: ``workflow.comfy_jobs``); its
        events carry ComfyUI's websocket events, output files (object refs) and the history entry."""
        args = (payload, self.client_id, timeout_s)
        return self._track(self._do("submit_comfy", *args), "submit_comfy", args)

    def follow_comfy(self, run_id: str, payload: dict, since: int = 0, timeout_s: float = 3600.0) -> RunHandle:
        """A handle on a ComfyUI run this client submitted before (e.g. from a process that has since
        been restarted), reading its events from ``since``; submitted again if the service restarts."""
        handle = self._track(run_id, "submit_comfy", (payload, self.client_id, timeout_s))
        handle.seek(since)
        return handle

    def comfy_cached(self, digests: list[str]) -> list[str]:
        """The model digests every ComfyUI worker's node caches already (a sender need not ship those)."""
        return self._do("comfy_cached", list(digests)) if self.remote else self._backend.comfy.cached(list(digests))

    def comfy_workers(self) -> list[dict]:
        """The ComfyUI workers the dispatcher knows: name, node, ComfyUI version, busy, paused."""
        return self._do("comfy_workers") if self.remote else self._backend.comfy.workers()

    def comfy_pause(self, name: str, paused: bool = True) -> list[str]:
        """Drain a ComfyUI worker: it finishes its prompt and takes no new one (``paused=False``: again);
        returns the paused workers."""
        return self._do("comfy_pause", name, paused) if self.remote else self._backend.comfy.pause(name, paused)

    def run(self, graph: Graph | dict | str | os.PathLike, release_level: int = 0, timeout_s: float = 3600.0,
            on_event: Callable[[dict], None] | None = None, check: bool = True,
            node_modules: list[str] | None = None) -> RunResult:
        """Submit and wait, passing every event to ``on_event``; with ``check`` a failed run raises WorkflowError."""
        return self.submit(graph, release_level, timeout_s, node_modules=node_modules).wait(timeout_s, on_event, check)

    def runs(self) -> list[dict]:
        """This client's runs and their states."""
        return self._do("runs", self.client_id)

    def close(self) -> None:
        """Embedded: cancel runs and stop cached node hosts.  Remote: nothing (the service stays)."""
        if not self.remote:
            self._backend.shutdown()


def run_graph(graph: Graph | dict | str | os.PathLike, release_level: int = 0, *, address: str | None = None,
              on_event: Callable[[dict], None] | None = None, timeout_s: float = 3600.0, check: bool = True,
              measure_store: bool = True, node_modules: list[str] | None = None) -> RunResult:
    """Run one graph embedded in this process (no service) and return its RunResult; ``node_modules``:
    modules of extra node types to import first (``workflow.modules``)."""
    g = (load_graph(graph, node_modules or ()) if isinstance(graph, (str, os.PathLike))
         else validate_graph(graph, modules=node_modules or ()))
    connect_ray(address)
    ex = Executor(measure_store=measure_store)
    try:
        result = ex.run(g, release_level, on_event=on_event, timeout_s=timeout_s)
    finally:
        ex.close()
    return result.raise_for_status() if check else result
