"""Many clients: the named, detached workflow service (``mesh-ray serve``) and the client API, which is
the same whether it talks to that service or runs embedded in the calling process.

    wf = Workflows.connect("auto")               # the service if one runs on the cluster, else embedded
    run = wf.submit(graph, release_level=2)      # a RunHandle with a run id
    for ev in run.follow(timeout=600): ...       # node started / finished, sampler step k of n
    result = run.result(timeout=600)             # RunResult: outputs, peaks, re-executed nodes
    run.cancel()

Faults: a client whose driver goes away (exits, crashes, loses its node) has its queued and
running runs cancelled and its cached outputs and node hosts freed within a few seconds; other
clients are not touched.  When the service itself is restarted under a connected client, the
client's next call finds the new service (and attaches again); a run the old service held is
reported lost in one line (submit it again), never waited on forever.
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
from mesh_ray.cluster.ray_errors import ray_get
from mesh_ray.workflow.events import TERMINAL
from mesh_ray.workflow.executor import Executor, RunResult, WorkflowError
from mesh_ray.workflow.graph import Graph, load_graph, read_graph, validate_graph
from mesh_ray.workflow.leases import LEASE_CHECK_S, ClientLeases, new_lease
from mesh_ray.workflow.modules import allowed_prefixes
from mesh_ray.workflow.scheduler import Scheduler

log = logging.getLogger("mesh_ray.workflow")

SERVICE_NAME = "mesh-ray/workflow-service"
SERVICE_NAMESPACE = "mesh-ray"
CALL_TIMEOUT_S = 60.0


@ray.remote(num_cpus=0, max_concurrency=64)
class WorkflowService:
    """The shared workflow service: a Scheduler in a detached actor; node tasks send progress to ``emit``."""

    def __init__(self, max_parallel: int = 2, node_module_prefixes: list[str] | None = None) -> None:
        self._s = Scheduler(sink=ray.get_runtime_context().current_actor, max_parallel=max_parallel,
                            node_module_prefixes=node_module_prefixes)
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

    def emit(self, run_id: str, ev: dict) -> None:
        self._s.emit(run_id, ev)

    def events(self, run_id: str, since: int = 0) -> list[dict]:
        return self._s.events(run_id, since)

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
                "node_module_prefixes": list(self._s.node_module_prefixes or ())}

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
    """One submitted run: its id, events, result and cancel."""

    def __init__(self, wf: "Workflows", run_id: str) -> None:
        self.wf, self.run_id = wf, run_id
        self._seen = 0

    def __repr__(self) -> str:
        return f"RunHandle({self.run_id})"

    def events(self) -> list[dict]:
        """Events since the last call (node started / finished, progress step k of n, run end)."""
        new = self.wf._do("events", self.run_id, self._seen)
        self._seen += len(new)
        return new

    def status(self) -> str:
        """queued | running | finished | failed | cancelled."""
        return self.wf._do("status", self.run_id)

    def cancel(self) -> bool:
        """Stop the run (nodes still running are cancelled); False if it had already ended."""
        return self.wf._do("cancel", self.run_id)

    def result(self, timeout: float = 600.0) -> RunResult:
        """Wait up to ``timeout`` s for the run to end and return its RunResult (any status)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            d = self.wf._do("result", self.run_id, max(0.0, min(left, 10.0)), timeout=min(left, 10.0) + CALL_TIMEOUT_S)
            if d is not None:
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
            new = self.events()
            yield from new
            if any(ev["type"] in TERMINAL for ev in new):
                return
            time.sleep(poll_s)
        raise WorkflowError(f"run {self.run_id} did not finish within {timeout:g} s: wait longer or cancel it")


class Workflows:
    """Client of workflow runs: through the shared service (``remote``) or an in-process scheduler."""

    def __init__(self, backend: Any, remote: bool, client_id: str | None = None) -> None:
        self._backend, self.remote = backend, remote
        self.client_id = client_id or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:4]}"
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
        if method == "submit" or method == "runs":
            return service_call(self._backend, method, *args, timeout=timeout)
        run_id = args[0]
        raise WorkflowError(f"run {run_id} was lost when the workflow service restarted: submit it again")

    def _reconnect(self) -> None:
        """The service died: use the one running now (started again with `mesh-ray serve`) or fail in one line."""
        gone = ServiceGone("the workflow service died and none runs now: start it again with `mesh-ray serve`, "
                           "then submit your runs again")
        handle = find_service()
        if handle is None:
            raise gone
        try:
            service_id = service_call(handle, "attach", self.client_id, self._lease)
        except ServiceGone:
            raise gone from None
        if service_id == self._service_id:
            raise gone
        log.warning("the workflow service was restarted: client %s attached to the new one", self.client_id)
        self._backend, self._service_id = handle, service_id

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
        run_id = self._do("submit", data, self.client_id, release_level, timeout_s, os.getcwd(), outputs,
                          list(dict.fromkeys(modules)))
        return RunHandle(self, run_id)

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
