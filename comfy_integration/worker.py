"""ComfyUI workers: named, detached Ray actors, each a headless ComfyUI that runs whole prompts.

    mesh-ray comfy workers --replicas 2 --comfyui ~/ComfyUI      # or start_workers(2, comfyui=...)
    mesh-ray comfy workers --stop                                # or stop_workers()

A worker imports the ComfyUI of ``ComfySource`` (``comfy_env.py``: the same code as the frontends,
shipped when its node lacks it), loads comfy_extras and the custom nodes of its folders, and runs
one prompt at a time with ComfyUI's own executor (its node cache and loaded models stay between
prompts).  It is a threaded actor: ComfyUI's executor runs its own asyncio loop in the prompt's
thread, while ``info``, ``interrupt`` and ``cached_models`` answer from others.  ``run`` is a
streaming generator of the items ``mesh_ray.workflow.comfy_jobs`` names; the dispatcher
(``mesh_ray.workflow.comfy_pool``) drives it.  Workers run whatever nodes a prompt names, as
ComfyUI does: give only trusted clients the cluster's token.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import ray

from mesh_ray.actors.shards import default_cache_dir
from mesh_ray.errors import ClusterError, ConfigError, MeshError
from mesh_ray.names import COMFY_WORKER_PREFIX, MESH_NAMESPACE
from mesh_ray.workflow.comfy_jobs import ITEM_DONE, ITEM_EVENT, ITEM_FILE

from .comfy_env import ComfySource

KEEP_OUTPUTS = 256  # files a worker keeps in its output and temp folders (a cached node's file is sent again)
RECEIVE_TIMEOUT_S = 600
BOOT_TIMEOUT_S = 600
MAX_CONCURRENCY = 8  # threads: one runs the prompt, the others answer info / interrupt / cached_models


def worker_home(name: str) -> Path:
    """A worker's own folder (input, output, temp, user, shipped models), beside mesh-ray's shard cache."""
    return Path(default_cache_dir()).parent / "comfy-workers" / name.replace("/", "_")


def model_cache_dir() -> Path:
    """The node's cache of model files received from frontends, by content digest."""
    return Path(default_cache_dir()).parent / "comfy-models"


class ComfyWorker:
    """One headless ComfyUI (see the module docstring); ``name`` is its actor name."""

    def __init__(self, name: str, source: ComfySource, custom_nodes: tuple[str, ...] = (),
                 model_roots: tuple[str, ...] = (), threads: int | None = None) -> None:
        t0 = time.perf_counter()
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.name, self.source = name, source
        self.where = source.activate()
        from . import headless, prompt_files

        self._files = prompt_files
        self._headless = headless
        home = worker_home(name)
        self.booted = headless.boot(str(home), tuple(custom_nodes), tuple(model_roots))
        self.runner = headless.Runner()
        self.shelf = prompt_files.ModelShelf(str(model_cache_dir()), str(home / "shipped"))
        self._running: str | None = None
        self._running_owner: str | None = None
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.prompts = 0
        self.boot_s = round(time.perf_counter() - t0, 2)

    def info(self, owner: str | None = None, claim: bool = False) -> dict:
        """What the dispatcher and ``mesh-ray status`` show.  ``claim``: a new dispatcher (``owner``)
        takes the worker over: a prompt still running for a dispatcher that died is interrupted."""
        import comfy.model_management as mm
        import psutil

        if claim and owner is not None:
            with self._lock:
                orphan = self._running if self._running_owner not in (None, owner) else None
            if orphan is not None:
                self.interrupt(orphan)
        return {"kind": "comfy-worker", "name": self.name, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "device": str(mm.get_torch_device()),
                "comfy_version": self.source.version, "comfy_digest": self.source.digest, "comfy_from": self.where,
                "node_types": self.booted.node_types, "failed_imports": self.booted.failed_imports,
                "busy": self._running is not None, "running": self._running, "prompts": self.prompts,
                "received_bytes": self.shelf.received_bytes, "boot_s": self.boot_s,
                "cached_models": self.shelf.cached([p.name for p in self.shelf.cache.glob("*") if p.is_file()
                                                    and not p.name.startswith(".")]),
                "rss_bytes": psutil.Process().memory_info().rss}

    def cached_models(self, digests: list[str]) -> list[str]:
        """The digests this worker's node caches."""
        return self.shelf.cached(list(digests))

    def interrupt(self, prompt_id: str) -> bool:
        """Stop ``prompt_id``: now when it runs here (at its next node or sampler step), or before it starts."""
        with self._lock:
            self._cancelled.add(prompt_id)
            running = self._running == prompt_id
        if running:
            self._headless.interrupt()
        return running

    def forget_client(self, client: str) -> int:
        """Delete the input files a client's prompts brought (the client went away)."""
        import shutil

        import folder_paths

        d = Path(folder_paths.get_input_directory()) / self._files.INPUT_SUBDIR / self._files.client_dir(client)
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            return 1
        return 0

    def run(self, job: dict, owner_id: str | None = None) -> Iterator[dict | bytes]:
        """Run one prompt: yields its ComfyUI events, each output file (a ``file`` item, then its bytes
        as the next item: streamed items belong to the caller, so they outlive this worker) and then one
        ``done`` item.  ``owner_id``: the dispatcher (see ``info``'s claim)."""
        pid, client = job["prompt_id"], job["client"]
        with self.runner.lock:  # one prompt at a time per process: ComfyUI's state is global
            with self._lock:
                self._running, self._running_owner = pid, owner_id
            try:
                yield from self._run(job, pid, client)
            finally:
                with self._lock:
                    self._running = self._running_owner = None
                    self._cancelled.discard(pid)
                self.prompts += 1

    def _run(self, job: dict, pid: str, client: str) -> Iterator[dict | bytes]:
        received = 0
        try:
            for model in job.get("models") or []:
                received += self.shelf.ensure(model, (job.get("chunks") or {}).get(model["digest"]),
                                              lambda ref: ray.get(ref, timeout=RECEIVE_TIMEOUT_S))
            prompt = self._files.place_inputs(copy.deepcopy(job["prompt"]), job.get("inputs") or {}, client)
        except MeshError as e:
            yield self._done("error", error=str(e), received=received)
            return
        if pid in self._cancelled:
            yield self._done("interrupted", error=f"prompt {pid} was interrupted before it started", received=received)
            return
        events: queue.Queue = queue.Queue()
        box: dict = {}

        def work() -> None:
            try:
                box["result"] = self.runner.run(prompt, pid, client, dict(job.get("extra_data") or {}),
                                                job.get("outputs"), lambda e, d: events.put((e, d)))
            except BaseException as e:  # noqa: BLE001 - reported as the prompt's error
                box["error"] = f"{type(e).__name__}: {e}"
            events.put(None)

        thread = threading.Thread(target=work, name=f"comfy-prompt-{pid}", daemon=True)
        thread.start()
        shipped: set = set()
        while True:
            try:
                item = events.get(timeout=0.5)
            except queue.Empty:
                if pid in self._cancelled:  # again: an interrupt before the executor started is reset by it
                    self._headless.interrupt()
                continue
            if item is None:
                break
            event, data = item
            if event == "executed" and isinstance(data, dict):
                yield from self._ship(data.get("output"), shipped, str(data.get("node")))
            yield {"kind": ITEM_EVENT, "event": event, "data": data}
        thread.join()
        if "error" in box:
            yield self._done("error", error=f"ComfyUI worker {self.name} failed: {box['error']}", received=received)
            return
        res = box["result"]
        for node, ui in (res.get("history") or {}).get("outputs", {}).items():
            yield from self._ship(ui, shipped, str(node))
        for d in ("output", "temp"):
            self._files.prune(self.booted.dirs[d], KEEP_OUTPUTS)
        yield self._done(res["status"], res.get("history"), res.get("messages"), res.get("error"), received)

    def _ship(self, ui: Any, shipped: set, node: str) -> Iterator[dict | bytes]:
        """One ``file`` item per output/temp file a node's UI output names (each once per prompt)."""
        for it in self._files.output_items(ui):
            ident = (it["type"], it["subfolder"], it["filename"])
            if ident in shipped or not os.path.isfile(it["path"]):
                continue
            shipped.add(ident)
            data = Path(it["path"]).read_bytes()
            meta = {k: it[k] for k in ("key", "type", "subfolder", "filename")}
            yield {"kind": ITEM_FILE, "meta": {**meta, "node": node}, "size": len(data)}
            yield data  # an item of its own: the dispatcher keeps its ref (owned by the caller) unread

    def _done(self, status: str, history: dict | None = None, messages: list | None = None, error: str | None = None,
              received: int = 0) -> dict:
        return {"kind": ITEM_DONE, "status": status, "history": history or {}, "messages": messages or [],
                "error": error, "worker": self.name, "received_bytes": received,
                "cached_models": self.shelf.cached([p.name for p in self.shelf.cache.glob("*") if p.is_file()
                                                    and not p.name.startswith(".")])}


ComfyWorkerActor = ray.remote(max_concurrency=MAX_CONCURRENCY)(ComfyWorker)


def worker_names(replicas: int) -> list[str]:
    return [f"{COMFY_WORKER_PREFIX}{i}" for i in range(replicas)]


def running_workers() -> list[str]:
    """The names of the ComfyUI workers alive on the connected cluster, in index order."""
    names = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        ns = entry.get("namespace") if isinstance(entry, dict) else MESH_NAMESPACE
        if ns == MESH_NAMESPACE and name.startswith(COMFY_WORKER_PREFIX):
            names.append(name)
    return sorted(names, key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else 1 << 30)


def start_workers(replicas: int, comfyui: str | None = None, custom_nodes: tuple[str, ...] = (),
                  models: tuple[str, ...] = (), num_gpus: float | None = None, num_cpus: float = 1.0,
                  threads: int | None = None, ship: str = "auto", extra_paths: tuple[str, ...] = (),
                  max_restarts: int = 3, timeout_s: float = BOOT_TIMEOUT_S, serve: bool = True) -> list[dict]:
    """Make exactly ``replicas`` ComfyUI workers run on the connected cluster (start the missing ones,
    stop ones beyond), wait until each has booted, and return their ``info``.  ``comfyui``: the
    ComfyUI folder (default ``$COMFYUI_PATH``); ``custom_nodes``/``models``: folders on the workers'
    nodes; ``num_gpus``: per worker (default 1 when the cluster has GPUs, else 0; fractions allowed);
    ``serve``: also start the dispatcher (``mesh-ray serve``) if none runs."""
    if replicas < 1:
        raise ConfigError(f"replicas={replicas} is invalid: start at least 1 ComfyUI worker (stop them with --stop)")
    path = comfyui or os.environ.get("COMFYUI_PATH")
    if not path:
        raise ConfigError("no ComfyUI folder given: pass --comfyui PATH (the same ComfyUI as the frontends) or set "
                          "COMFYUI_PATH")
    source = ComfySource.of(path, extra_paths, ship=ship).for_actors()
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    wanted = worker_names(replicas)
    for name in running_workers():
        if name not in wanted:
            _kill(name)
    handles = []
    for name in wanted:
        handles.append(ComfyWorkerActor.options(
            name=name, namespace=MESH_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=num_cpus,
            num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=0).remote(
                name, source, tuple(os.path.abspath(d) for d in custom_nodes),
                tuple(os.path.abspath(d) for d in models), threads))
    from mesh_ray.cluster.ray_errors import ray_get

    infos = [ray_get(h.info.remote(), timeout_s, f"ComfyUI worker {n} starting",
                     timeout_fix="check the worker's log (`ray logs`) and the cluster's free CPUs/GPUs with "
                                 "`mesh-ray status`", failed_fix="see the worker's log (`ray logs`)",
                     failed_error=ClusterError)
             for n, h in zip(wanted, handles)]
    mismatch = [i for i in infos if i["comfy_digest"] != source.digest]
    if mismatch:
        raise ConfigError(f"worker {mismatch[0]['name']} runs ComfyUI {mismatch[0]['comfy_version']} "
                          f"({mismatch[0]['comfy_digest'][:8]}), not {source.describe()}: stop the workers first "
                          f"(`mesh-ray comfy workers --stop`)")
    if serve:
        from mesh_ray.workflow.service import serve as serve_service

        serve_service()
    return [{k: v for k, v in i.items() if k != "node_types"} | {"node_types": len(i["node_types"])} for i in infos]


def stop_workers() -> list[str]:
    """Stop every ComfyUI worker on the connected cluster; returns their names."""
    names = running_workers()
    for name in names:
        _kill(name)
    return names


def _kill(name: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=MESH_NAMESPACE), no_restart=True)
    except ValueError:  # already gone
        pass


__all__ = ["ComfyWorker", "ComfyWorkerActor", "running_workers", "start_workers", "stop_workers", "worker_home"]
