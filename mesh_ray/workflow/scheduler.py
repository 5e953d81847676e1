"""Workflow graphs on the fair queue: the graph backend and the ``Scheduler`` that clients use.

A client's graph runs execute one after another on the client's own ``Executor`` (so each
client's level-0 cache stays its own); at most ``max_parallel`` graph runs execute at once across
clients.  The same scheduler also queues ComfyUI prompts for the ComfyUI worker pool
(``comfy_pool``), served round-robin with the graphs.  Used in-process (embedded) and inside the
workflow service actor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from mesh_ray.errors import ConfigError
from mesh_ray.workflow.comfy_pool import ComfyPool
from mesh_ray.workflow.executor import LEVELS, Executor, RunResult
from mesh_ray.workflow.fairqueue import FairQueue, Run
from mesh_ray.workflow.graph import Graph, validate_graph

GRAPH = "graph"
COMFY = "comfy"


@dataclass
class GraphJob:
    graph: Graph
    base_dir: str | None
    outputs: list[str] | None


class GraphBackend:
    """Graph runs on per-client Executors: one run per client, ``max_parallel`` in all."""

    kind = GRAPH
    per_client = 1
    max_tries = 1

    def __init__(self, sink: Any = None, max_parallel: int = 2, measure_store: bool = True) -> None:
        if max_parallel < 1:
            raise ConfigError(f"max_parallel={max_parallel} is invalid: use at least 1 concurrent run")
        self._sink, self.max_parallel, self._measure = sink, max_parallel, measure_store
        self._executors: dict[str, Executor] = {}
        self._busy: set[str] = set()  # clients with a run executing
        self._gone: set[str] = set()
        self._lock = threading.Lock()

    def acquire(self, run: Run) -> Any:
        with self._lock:
            if len(self._busy) >= self.max_parallel:
                return None
            self._busy.add(run.client)
            self._gone.discard(run.client)
            return run.client

    def execute(self, run: Run, slot: Any, emit: Callable[[dict], None]) -> RunResult:
        job: GraphJob = run.job
        with self._lock:
            ex = self._executors.setdefault(run.client, Executor(self._sink, self._measure))
        return ex.run(job.graph, run.level, run_id=run.run_id, on_event=emit, cancel=run.cancel,
                      timeout_s=run.timeout_s, base_dir=job.base_dir, outputs=job.outputs)

    def release(self, run: Run, slot: Any) -> None:
        with self._lock:
            self._busy.discard(run.client)
            ex = self._executors.pop(run.client, None) if run.client in self._gone else None
        if ex is not None:  # the client left while this run ran: free its cache and hosts now
            ex.close()

    def drop_client(self, client: str) -> None:
        with self._lock:
            self._gone.add(client)
            ex = None if client in self._busy else self._executors.pop(client, None)
        if ex is not None:
            ex.close()

    def clients(self) -> list[str]:
        with self._lock:
            return list(self._executors)

    def close(self) -> None:
        with self._lock:
            executors = list(self._executors.values())
        for ex in executors:
            ex.close()


class Scheduler(FairQueue):
    """Fair queues for workflow graphs (and ComfyUI prompts) from many clients (thread-safe)."""

    def __init__(self, sink: Any = None, max_parallel: int = 2, measure_store: bool = True,
                 node_module_prefixes: list[str] | None = None, owner: Any = None) -> None:
        """``node_module_prefixes``: the allow-list for node modules (None: this process's setting);
        ``owner``: the service actor this scheduler runs in, if any."""
        self.node_module_prefixes = node_module_prefixes
        self.graphs = GraphBackend(sink, max_parallel, measure_store)
        self.comfy = ComfyPool(owner=owner, on_change=self.poke)
        self.max_parallel = max_parallel
        super().__init__({GRAPH: self.graphs, COMFY: self.comfy})

    def submit(self, graph: dict | Graph, client_id: str = "default", release_level: int = 0, timeout_s: float = 3600.0,
               base_dir: str | None = None, outputs: list[str] | None = None, node_modules: list[str] | None = None) -> str:
        """Validate (importing ``node_modules`` here) and queue a graph; returns its run id at once."""
        if release_level not in LEVELS:
            raise ConfigError(f"release_level={release_level!r} is invalid: use 0, 1 or 2")
        g = validate_graph(graph, modules=node_modules or (), prefixes=self.node_module_prefixes)
        return self.enqueue(GRAPH, GraphJob(g, base_dir, outputs), client_id, release_level, timeout_s)

    def submit_comfy(self, payload: dict, client_id: str = "default", timeout_s: float = 3600.0) -> str:
        """Check a ComfyUI prompt (structure, ComfyUI version, node types the workers know) and queue it."""
        return self.enqueue(COMFY, self.comfy.prepare(payload, str(client_id)), client_id, 0, timeout_s)

    def clients(self) -> list[str]:
        """Clients that have an executor (a cache) here now."""
        return self.graphs.clients()


__all__ = ["COMFY", "GRAPH", "GraphBackend", "GraphJob", "Scheduler"]
