"""The ComfyUI worker pool: the fair queue's backend for ComfyUI prompts.

Workers are the named, detached ComfyUI actors that ``mesh-ray comfy workers`` starts
(``comfy_integration/worker.py``, names ``COMFY_WORKER_PREFIX<i>``); the pool finds them by name
every few seconds, so workers started or stopped later join or leave it.  A prompt goes to an
idle worker of the sender's ComfyUI (same content hash) that knows every node type it names;
among those, the pool prefers one whose node caches the prompt's models and that ran them last
(ComfyUI's own model cache), then one that ran the same client's last prompt.  Events stream from
the worker's ``run`` generator into the run; a cancel reaches it as ``interrupt``; a worker that dies
mid-prompt raises ``WorkerLost`` (the queue runs the prompt again elsewhere).  Nothing here imports
ComfyUI: the frontend and the worker validate the prompt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from mesh_ray.cluster.ray_errors import cause_line
from mesh_ray.errors import ConfigError
from mesh_ray.names import COMFY_WORKER_PREFIX, MESH_NAMESPACE
from mesh_ray.workflow.comfy_jobs import EV_COMFY, EV_DONE, EV_FILE, ITEM_DONE, ITEM_EVENT, ITEM_FILE, ComfyJob
from mesh_ray.workflow.events import event
from mesh_ray.workflow.executor import RunResult
from mesh_ray.workflow.fairqueue import Run, WorkerLost

log = logging.getLogger("mesh_ray.workflow")

REFRESH_S = 2.0  # how often the pool looks for workers by name
INFO_TIMEOUT_S = 2.0  # a worker still booting ComfyUI does not answer yet: asked again next time
ITEM_TIMEOUT_S = 120.0  # one streamed item of a live worker
RECENT_MODELS = 8  # digests of the models a worker ran last (ComfyUI keeps loaded models in memory)


@dataclass
class _Worker:
    name: str
    handle: Any
    info: dict
    busy: str | None = None  # the run id it executes
    uses: int = 0
    last_client: str | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_MODELS))

    @property
    def digest(self) -> str:
        return self.info.get("comfy_digest", "")

    @property
    def node(self) -> str:
        return self.info.get("node_id", "")


class ComfyPool:
    """A backend of ``FairQueue``: ComfyUI prompts on the cluster's ComfyUI workers."""

    kind = "comfy"
    per_client = 1 << 30  # a frontend may use every worker; the round-robin keeps frontends fair
    max_tries = 3

    def __init__(self, owner: Any = None, on_change: Callable[[], None] | None = None,
                 refresh_s: float = REFRESH_S) -> None:
        """``owner``: the service actor this pool runs in (a worker still running a prompt for a
        service that died is taken over by the new one); ``on_change``: called when workers come or go.
        Output files are streamed items, owned by this process: they outlive the worker that sent them."""
        self._on_change, self._refresh_s = on_change, refresh_s
        self._owner_id = ray.get_runtime_context().get_actor_id() if owner is not None else None
        self._workers: dict[str, _Worker] = {}
        self._paused: set[str] = set()  # workers that take no new prompt (drained)
        self._node_cache: dict[str, set[str]] = {}  # node id -> model digests its cache holds
        self._lock = threading.Lock()
        self._started = False
        self._stop = threading.Event()

    # -- workers ------------------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        self.refresh()
        threading.Thread(target=self._watch, name="mesh-ray-comfy-pool", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(self._refresh_s):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the watcher must outlive any one failure
                log.warning("ComfyUI worker discovery failed: %s", e)

    def refresh(self) -> None:
        """Find the named workers: new ones that answer join, ones whose name is gone leave."""
        names = set()
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else entry
            ns = entry.get("namespace") if isinstance(entry, dict) else MESH_NAMESPACE
            if ns == MESH_NAMESPACE and name.startswith(COMFY_WORKER_PREFIX):
                names.add(name)
        changed = False
        for name in names - set(self._workers):
            try:
                handle = ray.get_actor(name, namespace=MESH_NAMESPACE)
                info = ray.get(handle.info.remote(self._owner_id, True), timeout=INFO_TIMEOUT_S)
            except (GetTimeoutError, RayError, ValueError):
                continue  # booting, or already gone: next time
            with self._lock:
                self._workers[name] = _Worker(name, handle, info)
                self._node_cache.setdefault(info.get("node_id", ""), set()).update(info.get("cached_models", []))
            log.info("ComfyUI worker %s joined (%s)", name, info.get("comfy_version"))
            changed = True
        with self._lock:
            for name in set(self._workers) - names:
                if self._workers[name].busy is None:
                    del self._workers[name]
                    changed = True
        if changed and self._on_change is not None:
            self._on_change()

    def _dead(self, w: _Worker) -> None:
        with self._lock:
            if self._workers.get(w.name) is w:
                del self._workers[w.name]  # found again by name once Ray has restarted it

    def workers(self, discover: bool = True) -> list[dict]:
        """What the frontends show: each worker's name, node, ComfyUI and whether it is busy
        (``discover``: start looking for workers if the pool has not yet)."""
        if discover:
            self._ensure_started()
        with self._lock:
            return [{"name": w.name, "node_id": w.node, "comfy_version": w.info.get("comfy_version"),
                     "comfy_digest": w.digest, "device": w.info.get("device"), "busy": w.busy is not None,
                     "paused": w.name in self._paused, "uses": w.uses} for w in self._workers.values()]

    def pause(self, name: str, paused: bool = True) -> list[str]:
        """Drain a worker (it finishes its prompt and takes no new one) or let it take prompts again;
        returns the paused workers."""
        with self._lock:
            if paused:
                self._paused.add(name)
            else:
                self._paused.discard(name)
            out = sorted(self._paused)
        if not paused and self._on_change is not None:
            self._on_change()
        return out

    def cached(self, digests: list[str]) -> list[str]:
        """The model digests that every worker's node has in its cache (the sender need not ship them)."""
        self._ensure_started()
        with self._lock:
            workers = list(self._workers.values())
        if not workers:
            return []
        want = list(dict.fromkeys(digests))
        refs = [w.handle.cached_models.remote(want) for w in workers]
        have = set(want)
        for w, ref in zip(workers, refs):
            try:
                got = set(ray.get(ref, timeout=30))
            except RayError:
                continue  # a dead worker decides nothing
            with self._lock:
                self._node_cache.setdefault(w.node, set()).update(got)
            have &= got
        return [d for d in want if d in have]

    # -- the backend --------------------------------------------------------------------------------

    def prepare(self, payload: Any, client: str) -> ComfyJob:
        """The checked job of a payload.  With workers running: one of the sender's ComfyUI must be
        among them, and some must know every node type (else a one-line ConfigError).  With none
        running, the prompt waits in the queue until one starts."""
        job = ComfyJob.from_payload(payload, client)
        self._ensure_started()
        with self._lock:
            workers = list(self._workers.values())
        if not workers:
            return job
        want = job.comfy.get("digest")
        if want and not any(w.digest == want for w in workers):
            theirs = sorted({f"{w.info.get('comfy_version')} ({w.digest[:8]})" for w in workers})
            raise ConfigError(f"the ComfyUI workers run ComfyUI {', '.join(theirs)}, this frontend "
                              f"{job.comfy.get('version')} ({want[:8]}): start workers of the same ComfyUI "
                              f"(`mesh-ray comfy workers --stop`, then `mesh-ray comfy workers --comfyui PATH`)")
        known = set().union(*(set(w.info.get("node_types", ())) for w in workers if not want or w.digest == want))
        missing = sorted(job.class_types() - known)
        if missing:
            nid = next(n for n, node in job.prompt.items() if node["class_type"] == missing[0])
            raise ConfigError(f"node {nid!r} has class_type {missing[0]!r}, which no ComfyUI worker knows: install "
                              f"its custom node on the workers (`mesh-ray comfy workers --custom-nodes DIR`)")
        return job

    def acquire(self, run: Run) -> Any:
        """An idle worker for the prompt (see the module docstring), or None (the queue's lock is held:
        no Ray call here; ``prepare`` started the discovery)."""
        job: ComfyJob = run.job
        want, types, models = job.comfy.get("digest"), job.class_types(), job.digests()
        with self._lock:
            able = [w for w in self._workers.values() if (not want or w.digest == want) and w.name not in self._paused
                    and types <= set(w.info.get("node_types", ()))]
            others = [w for w in able if w.name not in run.avoid]
            idle = [w for w in (others or able) if w.busy is None]
            if not idle:
                return None

            def score(w: _Worker) -> tuple:
                cached = len(models & self._node_cache.get(w.node, set()))
                loaded = len(models & set(w.recent))
                return (loaded, cached, w.last_client == run.client, -w.uses)

            best = max(idle, key=score)
            best.busy = run.run_id
            return best

    def execute(self, run: Run, slot: _Worker, emit: Callable[[dict], None]) -> RunResult:
        job: ComfyJob = run.job
        w = slot
        emit(event(run.run_id, "run_started", worker=w.name, attempt=run.tries + 1))
        try:
            gen = w.handle.run.options(num_returns="streaming").remote(job.for_worker(), self._owner_id)
        except RayError as e:
            self._dead(w)
            run.avoid.add(w.name)
            raise WorkerLost(f"ComfyUI worker {w.name} is gone ({type(e).__name__})") from None
        deadline = time.monotonic() + run.timeout_s
        interrupted = None  # when the interrupt was sent
        done = None
        while done is None:
            if (run.cancel.is_set() or time.monotonic() > deadline) and interrupted is None:
                w.handle.interrupt.remote(job.prompt_id)
                interrupted = time.monotonic()
            if interrupted is not None and time.monotonic() > interrupted + ITEM_TIMEOUT_S:
                return RunResult(run.run_id, "failed", 0, error=(
                    f"ComfyUI worker {w.name} did not stop prompt {job.prompt_id} within {ITEM_TIMEOUT_S:g} s of "
                    f"its interrupt: restart the workers (`mesh-ray comfy workers --stop`, then start them again)"))
            try:
                ready, _ = ray.wait([gen], timeout=0.5)
                if not ready:
                    continue
                item = ray.get(next(gen), timeout=ITEM_TIMEOUT_S)
                if item.get("kind") == ITEM_FILE:  # its bytes are the next item: kept as a ref, never read here
                    ready, _ = ray.wait([gen], timeout=ITEM_TIMEOUT_S)
                    if not ready:
                        raise GetTimeoutError(f"no file bytes within {ITEM_TIMEOUT_S:g} s")
                    item = {**item, "ref": [next(gen)]}
            except StopIteration:
                break
            except (RayActorError, GetTimeoutError) as e:
                self._dead(w)
                run.avoid.add(w.name)
                raise WorkerLost(f"ComfyUI worker {w.name} died while running prompt {job.prompt_id} "
                                 f"({type(e).__name__})") from None
            except RayError as e:  # the worker's own code failed: not a reason to run it elsewhere
                return RunResult(run.run_id, "failed", 0, error=f"ComfyUI worker {w.name} failed: {cause_line(e)}")
            kind = item.get("kind")
            if kind == ITEM_EVENT:
                emit({"type": EV_COMFY, "event": item["event"], "data": item["data"]})
            elif kind == ITEM_FILE:
                emit({"type": EV_FILE, "meta": item["meta"], "ref": item["ref"], "size": item["size"], "worker": w.name})
            elif kind == ITEM_DONE:
                done = item
        if done is None:
            return RunResult(run.run_id, "failed", 0, error=f"ComfyUI worker {w.name} ended prompt {job.prompt_id} "
                                                            f"without a result: see its log")
        w.recent.extend(job.digests())
        with self._lock:
            self._node_cache.setdefault(w.node, set()).update(done.get("cached_models", []))
        emit({"type": EV_DONE, "worker": w.name, "status": done["status"], "history": done.get("history") or {},
              "messages": done.get("messages") or [], "received_bytes": done.get("received_bytes", 0),
              "error": done.get("error")})
        if done["status"] == "success":
            return RunResult(run.run_id, "finished", 0)
        if interrupted is not None and not run.cancel.is_set():
            return RunResult(run.run_id, "failed", 0, error=f"prompt {job.prompt_id} did not finish within "
                                                            f"{run.timeout_s:g} s: raise its timeout")
        if done["status"] == "interrupted" or run.cancel.is_set():
            return RunResult(run.run_id, "cancelled", 0, error=f"prompt {job.prompt_id} was interrupted")
        return RunResult(run.run_id, "failed", 0, error=done.get("error") or f"prompt {job.prompt_id} failed on {w.name}")

    def release(self, run: Run, slot: _Worker) -> None:
        with self._lock:
            slot.busy = None
            slot.uses += 1
            slot.last_client = run.client
        if self._on_change is not None:
            self._on_change()

    def drop_client(self, client: str) -> None:
        """Forget the client's affinity and its input files on the workers."""
        with self._lock:
            workers = list(self._workers.values())
            for w in workers:
                if w.last_client == client:
                    w.last_client = None
        for w in workers:
            try:
                w.handle.forget_client.remote(client)
            except RayError:
                pass

    def close(self) -> None:
        self._stop.set()


__all__ = ["ComfyPool", "REFRESH_S"]
