"""The executor: runs a graph's nodes as Ray tasks (or actor calls on node hosts) as soon as their
inputs exist, keeps outputs as ObjectRefs, and releases them by level.

Release levels: 0 keeps every output to the end of the run (and reuses unchanged nodes in the next
run of this executor, as ComfyUI does); 1 drops outputs no node references as soon as they are
produced; 2 also drops each output once all its consumers have finished.  An expansion that links
to an output already dropped makes its producer run again (logged, and listed in ``reexecuted``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import ray

from mesh_ray.errors import MeshError
from mesh_ray.cluster.ray_errors import cause_line, ray_get
from mesh_ray.workflow.events import EventRelay, event
from mesh_ray.workflow.graph import Graph, Link, NodeSpec, is_link, validate_graph
from mesh_ray.workflow.memory import LiveSet
from mesh_ray.workflow.runtime import NodeHost, run_task

log = logging.getLogger("mesh_ray.workflow")

LEVELS = (0, 1, 2)


class WorkflowError(MeshError):
    """A workflow run failed: a node raised, the run was cancelled or timed out, or an expansion was invalid."""


@dataclass
class RunResult:
    """What a run produced: status, output nodes' values, memory peaks, and which nodes ran."""

    run_id: str
    status: str  # finished | failed | cancelled
    release_level: int
    outputs: dict[str, list] = field(default_factory=dict)
    error: str | None = None
    failed_node: str | None = None
    peak_live_bytes: int = 0
    peak_store_bytes: int | None = None
    executed: list[str] = field(default_factory=list)
    reexecuted: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    sizes: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def raise_for_status(self) -> "RunResult":
        """Return self when the run finished; raise WorkflowError (one line) otherwise."""
        if self.status != "finished":
            raise WorkflowError(self.error or f"run {self.run_id} {self.status}")
        return self


@dataclass
class _Cached:
    refs: list
    sizes: list[int]
    host: str | None
    results: list | None


class Executor:
    """Runs graphs on Ray.  One executor keeps the level-0 cache between its runs; ``close()`` drops it.

    ``sink``: an actor with ``emit.remote(run_id, event)`` that node tasks send progress to (the
    workflow service passes itself); None makes a small relay actor on first need.
    """

    def __init__(self, sink: Any = None, measure_store: bool = True) -> None:
        self._sink = sink
        self._relay: Any = None
        self.measure_store = measure_store
        self._cache: dict[str, _Cached] = {}
        self._hosts: dict[str, Any] = {}  # host token -> actor, for hosts kept by the cache
        self._lock = threading.Lock()

    def _progress_sink(self) -> tuple[Any, bool]:
        """(actor that receives progress, whether this executor must poll it)."""
        if self._sink is not None:
            return self._sink, False
        if self._relay is None:
            self._relay = EventRelay.remote()
        return self._relay, True

    def run(self, graph: Graph | dict, release_level: int = 0, *, run_id: str | None = None,
            on_event: Callable[[dict], None] | None = None, cancel: threading.Event | None = None,
            timeout_s: float = 3600.0, base_dir: str | None = None, outputs: list[str] | None = None,
            node_modules: list[str] | None = None) -> RunResult:
        """Run ``graph`` (with the types of ``node_modules``, see ``workflow.modules``) to the end and return
        its RunResult (a failed node gives status 'failed', never a half-finished run: nodes still running
        are cancelled)."""
        if release_level not in LEVELS:
            raise WorkflowError(f"release_level={release_level!r} is invalid: use 0 (keep all), 1 (drop unreferenced) "
                                f"or 2 (drop after the last consumer)")
        g = validate_graph(graph, modules=node_modules or ())
        with self._lock:  # one run at a time per executor: the cache is not shared between concurrent runs
            return _Run(self, g, release_level, run_id or uuid.uuid4().hex[:12], on_event, cancel or threading.Event(),
                        timeout_s, base_dir or os.getcwd(), set(outputs or ())).execute()

    def close(self) -> None:
        """Drop the cached outputs and stop the node hosts they keep."""
        self._cache.clear()
        _wait_closed([_close_host(h) for h in self._hosts.values()])
        self._hosts.clear()
        if self._relay is not None:
            _kill(self._relay)
            self._relay = None


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _close_host(host: Any) -> Any:
    """Ask a node host to close what it holds and exit; returns the call's ref (ready once it ended)."""
    try:
        return host.close.remote()
    except Exception:  # noqa: BLE001
        _kill(host)
        return None


def _wait_closed(refs: list, timeout_s: float = 60.0) -> None:
    """Give closing hosts time to finish (a VAE service's forget-mode writes), bounded."""
    refs = [r for r in refs if r is not None]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=False)


class _Run:
    """The state of one run; ``execute`` is its event loop."""

    def __init__(self, ex: Executor, graph: Graph, level: int, run_id: str, on_event: Callable | None,
                 cancel: threading.Event, timeout_s: float, base_dir: str, want: set[str]):
        self.ex, self.level, self.run_id = ex, level, run_id
        self.g = Graph(dict(graph.nodes), dict(graph.types), list(graph.order), graph.modules)
        self.on_event, self.cancel, self.timeout_s, self.base_dir, self.want = on_event, cancel, timeout_s, base_dir, want
        self.status = {nid: "waiting" for nid in self.g.nodes}
        self.refs: dict[str, list] = {}
        self.sizes: dict[str, list[int]] = {}
        self.consumers = self.g.consumers()
        self.live = LiveSet(ex.measure_store)
        self.running: dict[Any, str] = {}  # metadata ref -> node id
        self.out_refs: dict[str, list] = {}  # node id -> output refs while it runs
        self.host_of: dict[str, str] = {}  # node id -> host token it ran on
        self.hosts: dict[str, Any] = {}  # host token -> actor
        self.host_outputs: dict[str, set[Link]] = {}  # host token -> live outputs produced there
        self.sig: dict[str, str] = {}
        self.results: dict[str, list] = {}
        self.executed: list[str] = []
        self.reexecuted: list[str] = []
        self.cached: list[str] = []
        self.used_cache: dict[str, _Cached] = {}
        self.closing: list = []  # refs of host close calls
        self.sink, self.poll = (ex._progress_sink() if any("progress" in t.injected for t in self.g.types.values())
                                else (None, False))
        self.t0 = time.monotonic()

    # -- events ---------------------------------------------------------------------------------

    def emit(self, type_: str, nid: str | None = None, **fields: Any) -> None:
        if nid is not None:
            fields = {"node": nid, "class_type": self.g.nodes[nid].class_type, **fields}
        ev = event(self.run_id, type_, **fields)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception as e:  # noqa: BLE001 - a broken display must not break the run
                log.warning("workflow event handler failed: %s", e)

    def drain_progress(self) -> None:
        if self.poll and self.sink is not None:
            try:
                for ev in ray.get(self.sink.drain.remote(self.run_id), timeout=30):
                    if self.on_event is not None:
                        self.on_event(ev)
            except Exception as e:  # noqa: BLE001 - progress is best effort
                log.debug("progress relay: %s", e)

    # -- scheduling -------------------------------------------------------------------------------

    def signature(self, nid: str) -> str:
        spec = self.g.nodes[nid]
        parts = [spec.class_type, json.dumps(self.g.literals(nid), sort_keys=True, default=repr),
                 sorted((name, self.sig.get(src, src), k) for name, (src, k) in self.g.links(nid).items())]
        return hashlib.blake2b(json.dumps(parts).encode(), digest_size=12).hexdigest()

    def ready(self, nid: str) -> bool:
        return all(self.status.get(src) == "done" and self.refs.get(src) and self.refs[src][k] is not None
                   for src, k in self.g.links(nid).values())

    def host_for(self, nid: str) -> str | None:
        """The host an input of ``nid`` lives in (hosted outputs are used where they are)."""
        found = {self.host_of[src] for src, _ in self.g.links(nid).values()
                 if self.g.types[src].host and src in self.host_of}
        if len(found) > 1:
            raise WorkflowError(f"node {nid!r} ({self.g.nodes[nid].class_type}) takes outputs of hosted nodes that live "
                                f"in different actors: feed it from one loader, or pass the data through a plain node")
        return found.pop() if found else None

    def submit(self, nid: str) -> None:
        nt = self.g.types[nid]
        self.sig[nid] = self.signature(nid)
        cached = self.ex._cache.get(self.sig[nid]) if self.level == 0 and nt.cache else None
        if cached is not None:
            self.status[nid] = "done"
            self.cached.append(nid)
            self.used_cache[self.sig[nid]] = cached
            if cached.host:
                self.hosts[cached.host] = self.ex._hosts[cached.host]
                self.host_of[nid] = cached.host
            self.finish_outputs(nid, list(cached.refs), list(cached.sizes), cached.results)
            self.emit("node_cached", nid)
            return
        inputs = {**self.g.literals(nid), **{name: self.refs[src][k] for name, (src, k) in self.g.links(nid).items()}}
        ctx = {"run_id": self.run_id, "node_id": nid, "sink": self.sink, "base_dir": self.base_dir}
        n = len(nt.outputs) + 1
        if nt.host:
            token = f"{nid}@{uuid.uuid4().hex[:6]}"
            self.hosts[token] = NodeHost.options(num_cpus=nt.num_cpus, num_gpus=nt.num_gpus).remote()
            self.host_of[nid] = token
            res = self.hosts[token].run.options(num_returns=n).remote(nt, ctx, True, **inputs)
        elif (token := self.host_for(nid)) is not None:
            self.host_of[nid] = token
            res = self.hosts[token].run.options(num_returns=n).remote(nt, ctx, False, **inputs)
        else:
            res = run_task.options(num_cpus=nt.num_cpus, num_gpus=nt.num_gpus, num_returns=n).remote(nt, ctx, **inputs)
        refs = res if isinstance(res, list) else [res]
        self.running[refs[-1]] = nid
        self.out_refs[nid] = refs[:-1]
        self.status[nid] = "running"
        self.emit("node_started", nid)

    def schedule(self) -> None:
        for nid in list(self.g.nodes):
            if self.status[nid] == "waiting" and self.ready(nid):
                self.submit(nid)

    # -- completion ---------------------------------------------------------------------------------

    def complete(self, meta_ref: Any) -> None:
        nid = self.running.pop(meta_ref)
        refs = self.out_refs.pop(nid)
        try:
            meta = ray.get(meta_ref, timeout=60)
        except Exception as e:  # noqa: BLE001 - the node's own error, whatever its type
            for r in refs:  # read once so that Ray does not also print them as unhandled errors
                try:
                    ray.get(r, timeout=5)
                except Exception:  # noqa: BLE001
                    pass
            raise _NodeFailed(nid, cause_line(e)) from None
        self.status[nid] = "done"
        self.executed.append(nid)
        if "expand" in meta:
            self.sizes[nid] = [0] * len(refs)
            self.refs[nid] = [None] * len(refs)
            self.expand(nid, meta["expand"])
            self.emit("node_finished", nid, ms=meta["ms"], expanded=len(meta["expand"]["nodes"]))
        else:
            results = None
            if self.g.types[nid].output or nid in self.want:
                results = ray_get(refs, 60, f"reading the outputs of node {nid!r}", failed_error=WorkflowError)
            self.finish_outputs(nid, refs, meta["sizes"], results)
            if self.level == 0 and self.g.types[nid].cache:
                self.used_cache[self.sig[nid]] = _Cached(refs, meta["sizes"], self.host_of.get(nid)
                                                         if self.g.types[nid].host else None, results)
            self.emit("node_finished", nid, ms=meta["ms"], bytes=sum(meta["sizes"]))
        for src, k in set(self.g.links(nid).values()):
            self.maybe_release((src, k))

    def finish_outputs(self, nid: str, refs: list, sizes: list[int], results: list | None) -> None:
        """Record a node's outputs (keeping ones still alive from an earlier run of it) and release by level."""
        old = self.refs.get(nid) or [None] * len(refs)
        self.refs[nid] = [o if o is not None else r for o, r in zip(old, refs)]
        self.sizes[nid] = list(sizes)
        host = self.host_of.get(nid)
        for k, size in enumerate(sizes):
            self.live.add((nid, k), size)
            if host is not None:
                self.host_outputs.setdefault(host, set()).add((nid, k))
        if results is not None:
            self.results[nid] = results
        for k in range(len(refs)):
            self.maybe_release((nid, k))

    def maybe_release(self, link: Link) -> None:
        nid, k = link
        if self.level == 0 or not self.refs.get(nid) or self.refs[nid][k] is None:
            return
        users = self.consumers.get(link, set())
        if (self.level == 1 and not users) or (self.level == 2 and all(self.status[c] == "done" for c in users)):
            self.release(link)

    def release(self, link: Link) -> None:
        nid, k = link
        self.refs[nid][k] = None  # the last reference: Ray frees the object
        self.live.drop(link)
        host = self.host_of.get(nid)
        if host is not None:
            outs = self.host_outputs.get(host, set())
            outs.discard(link)
            busy = any(self.host_of.get(r) == host for r in self.running.values())
            if not outs and not busy and host in self.hosts:
                self.closing.append(_close_host(self.hosts.pop(host)))  # frees the model and the actors it started
                self.host_outputs.pop(host, None)

    # -- expansion ----------------------------------------------------------------------------------

    def expand(self, parent: str, exp: dict) -> None:
        """Add an expansion's nodes, re-point the parent's consumers, and re-run released producers they need."""
        raw = exp["nodes"]
        if not isinstance(raw, dict):
            raise _NodeFailed(parent, "its expansion is not an object {id: node}: return Expansion({id: {...}}, result=[...])")
        new_ids = {str(i): f"{parent}.{i}" for i in raw}

        def fix(v: Any) -> Any:
            return [new_ids[v[0]], v[1]] if is_link(v) and v[0] in new_ids else v

        data = {new_ids[str(i)]: {**spec, "inputs": {n: fix(v) for n, v in (spec.get("inputs") or {}).items()}}
                if isinstance(spec, dict) else spec for i, spec in raw.items()}
        try:
            sub = validate_graph(data, existing=self.g)
        except MeshError as e:
            raise _NodeFailed(parent, f"invalid expansion: {e}") from None
        self.g.nodes.update(sub.nodes)
        self.g.types.update(sub.types)
        for nid in sub.nodes:
            self.status[nid] = "waiting"
            for src in self.g.links(nid).values():
                self.consumers.setdefault(src, set()).add(nid)
        results = list(exp.get("result") or [])
        n_out = len(self.g.types[parent].outputs)
        if len(results) < n_out:
            raise _NodeFailed(parent, f"its expansion gives {len(results)} results for {n_out} outputs: one per output")
        for k in range(n_out):
            target = fix(results[k])
            for c in sorted(self.consumers.pop((parent, k), set())):
                spec = self.g.nodes[c]
                inputs = {n: (target if is_link(v) and v[0] == parent and v[1] == k else v) for n, v in spec.inputs.items()}
                self.g.nodes[c] = NodeSpec(class_type=spec.class_type, inputs=inputs)
                if is_link(target):
                    self.consumers.setdefault((target[0], target[1]), set()).add(c)
                    if target[0] not in sub.nodes:
                        self.ensure((target[0], target[1]), c)
        for nid in sub.nodes:
            for src, k in self.g.links(nid).values():
                if src not in sub.nodes:
                    self.ensure((src, k), nid)

    def ensure(self, link: Link, needed_by: str) -> None:
        """Make sure ``link`` will exist: if its output was released, run its producer again."""
        src, k = link
        if self.status[src] in ("waiting", "running") or (self.refs.get(src) and self.refs[src][k] is not None):
            return
        msg = (f"re-running node {src!r} ({self.g.nodes[src].class_type}): its output {k} was released "
               f"(release level {self.level}) and node {needed_by!r} needs it")
        log.warning("%s", msg)
        self.status[src] = "waiting"
        self.reexecuted.append(src)
        self.emit("node_rerun", src, message=msg)
        for s, j in self.g.links(src).values():
            self.ensure((s, j), src)

    # -- loop -----------------------------------------------------------------------------------------

    def execute(self) -> RunResult:
        self.emit("run_started", release_level=self.level, nodes=len(self.g.nodes))
        status, error, failed = "finished", None, None
        try:
            while True:
                if self.cancel.is_set():
                    status, error = "cancelled", f"run {self.run_id} was cancelled"
                    break
                if time.monotonic() - self.t0 > self.timeout_s:
                    raise _NodeFailed(None, f"the run took longer than timeout_s={self.timeout_s:g}: raise the timeout "
                                            f"or check the nodes still running: {', '.join(self.running.values())}")
                self.schedule()
                if not self.running:
                    stuck = [n for n, s in self.status.items() if s != "done"]
                    if stuck:
                        raise _NodeFailed(stuck[0], "it can never run: an input it needs was not produced")
                    break
                ready, _ = ray.wait(list(self.running), num_returns=1, timeout=0.2, fetch_local=False)
                if ready:
                    rest = [r for r in self.running if r not in ready]
                    more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False) if rest else ([], [])
                    for ref in ready + more:
                        self.complete(ref)
                    self.live.sample_store()
                self.drain_progress()
        except _NodeFailed as e:
            status, failed = "failed", e.node
            where = f"node {e.node!r} ({self.g.nodes[e.node].class_type}) failed" if e.node else f"run {self.run_id} failed"
            error = f"{where}: {e.text}"
            if e.node:
                self.emit("node_failed", e.node, message=e.text)
        finally:
            self.stop_running()
        self.drain_progress()
        self.live.sample_store()
        result = RunResult(self.run_id, status, self.level, outputs=dict(self.results), error=error, failed_node=failed,
                           peak_live_bytes=self.live.peak, peak_store_bytes=self.live.peak_store,
                           executed=self.executed, reexecuted=self.reexecuted, cached=self.cached,
                           sizes=dict(self.sizes), seconds=round(time.monotonic() - self.t0, 3))
        self.finish(status == "finished")
        self.emit({"finished": "run_finished", "failed": "run_failed", "cancelled": "run_cancelled"}[status],
                  message=error, peak_live_bytes=result.peak_live_bytes)
        return result

    def stop_running(self) -> None:
        for ref in list(self.running):
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - actor calls and finished tasks cannot always be cancelled
                pass
        self.running.clear()

    def finish(self, ok: bool) -> None:
        """End of run: level 0 keeps this run's outputs as the cache; otherwise everything is dropped."""
        ex = self.ex
        if self.level == 0 and ok:
            keep_hosts = {c.host for c in self.used_cache.values() if c.host}
            for token, h in list(ex._hosts.items()):
                if token not in keep_hosts:
                    self.closing.append(_close_host(h))
            ex._hosts = {t: self.hosts.get(t) or ex._hosts[t] for t in keep_hosts}
            ex._cache = dict(self.used_cache)
            for token, h in self.hosts.items():
                if token not in keep_hosts:
                    self.closing.append(_close_host(h))
        else:
            for token, h in self.hosts.items():
                if token not in ex._hosts:
                    if not ok:  # failed or cancelled: a host may be busy; stop it now
                        _kill(h)
                    else:
                        self.closing.append(_close_host(h))
        _wait_closed(self.closing)
        self.refs.clear()
        self.hosts.clear()


class _NodeFailed(Exception):
    def __init__(self, node: str | None, text: str):
        super().__init__(text)
        self.node, self.text = node, text
