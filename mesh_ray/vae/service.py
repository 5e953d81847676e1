"""VaeService: a pool of VAE decoder actors with Wait / Forget / Promise decoding.

    vae = VaeService("ae.safetensors", replicas=2)          # Ray must be initialised
    images = vae.decode(latent)                              # wait: [B, H, W, C] float 0..1
    vae.decode(latent, mode="forget", save="run1/img")       # actor writes PNGs, returns at once
    p = vae.decode(latent, mode="promise"); p.save("out/")   # returns at once, writes when ready

Dispatch goes to the replica with the fewest requests in flight.  A replica whose actor died
(killed, crashed, out of memory) or exited on its idle timeout is started again on the next
request.  A request whose actor dies before answering (any mode) is sent again, up to
``max_retries`` times, to the least-loaded replica (started again when it was the dead one); only
then does it fail, with one ``ClusterError`` that says how often it was tried.  A monitor thread
collects finished requests, so forget-mode failures are logged and counted (``stats()``) without
anyone waiting on them, and re-sends the requests of a dead actor at once.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from mesh_ray.actors.shards import send_shard
from mesh_ray.actors.vae import VaeDecoderActor, check_prefix
from mesh_ray.actors.vae_host import FluxVaeHost, VaeHost, flux_options
from mesh_ray.cluster.resources import default_num_gpus
from mesh_ray.config import VaeOptions, validate
from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.models.images import save_images
from mesh_ray.models.vae import VaeConfig, VaeInfo
from mesh_ray.names import VAE_MODES, VaeMode
from mesh_ray.cluster import metrics
from mesh_ray.vae.promise import Promise, actor_lost, decoder_error

log = logging.getLogger("mesh_ray.vae")

MODES = VAE_MODES
SHIP = ("auto", "always", "never")


@dataclass
class _Replica:
    index: int
    handle: Any = None
    in_flight: dict = field(default_factory=dict)  # status (or forget result) ObjectRef -> _Request
    last_used: float = 0.0
    alive: bool = False
    starts: int = 0
    completed: int = 0
    failed: int = 0


@dataclass
class _Request:
    """One decode, kept until it ends so that it can be sent again when its actor dies."""

    mode: str
    send: Callable[[Any], tuple[ray.ObjectRef, ray.ObjectRef]]  # actor handle -> (status ref, result ref)
    status: Any = None
    result: Any = None
    replica: _Replica | None = None
    handle: Any = None  # the actor it was sent to
    tries: int = 0
    promise: Promise | None = None
    spent: bool = False  # died after its last try (counted as failed once)


def _nodes_alive() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _as_numpy(latent: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(latent, torch.Tensor):
        return latent.detach().to("cpu", torch.float32).contiguous().numpy()
    return np.ascontiguousarray(latent, dtype=np.float32)


class VaeService:
    """A pool of ``replicas`` VAE decoder actors for one VAE.

    ``checkpoint``: a FLUX VAE safetensors file (``decoder.*`` keys, BFL ae.safetensors layout: its
    header is read here, the weights by each actor; mesh-ray's own decoder), or any ``VaeHost``
    (``mesh_ray.actors.vae_host``), e.g. ComfyUI's own VAE class from ``comfy_integration``.
    ``options`` (a ``VaeOptions`` or dict) and keywords are ``VaeOptions`` fields (replicas,
    num_gpus, num_cpus, idle_timeout_s, output_dir, torch_threads, dtype, timeout_s); keywords win.
    """

    def __init__(self, checkpoint: str | os.PathLike | VaeHost, replicas: int | None = None,
                 options: VaeOptions | dict | None = None, **kwargs: Any):
        if not ray.is_initialized():
            raise ClusterError("Ray is not initialised: call mesh_ray.connect() (or ray.init()) before creating a VaeService")
        base = options.model_dump(exclude_unset=True) if isinstance(options, VaeOptions) else dict(options or {})
        base.update({k: v for k, v in {"replicas": replicas, **kwargs}.items() if v is not None})
        self.options = opts = validate(VaeOptions, base)
        replicas = opts.replicas
        num_gpus = opts.num_gpus
        self.host: VaeHost = checkpoint if isinstance(checkpoint, VaeHost) else FluxVaeHost(checkpoint)
        flux = isinstance(self.host, FluxVaeHost)
        self.checkpoint = self.host.checkpoint if flux else self.host.label
        self.info: VaeInfo | None = self.host.info if flux else None  # mesh-ray's own decoder only
        self.config: VaeConfig | None = self.host.config if flux else None
        self.num_gpus = default_num_gpus() if num_gpus is None else num_gpus
        self.num_cpus = opts.num_cpus
        self.idle_timeout_s = opts.idle_timeout_s
        self.output_dir = str(Path(opts.output_dir).resolve())
        self.torch_threads = opts.torch_threads
        self.dtype = opts.dtype
        self.timeout_s = opts.timeout_s
        self.max_retries = opts.max_retries
        self.ship = opts.ship
        self.cache_dir = opts.cache_dir
        if self.ship == "never" and not self.host.reads_file:
            raise ConfigError(f"ship='never' needs a VAE file the decoders read, but {self.host.label} always "
                              f"travels through the object store: use ship='auto'")
        self._state: dict | None = None  # decoder tensors of a file, read once when a replica needs them shipped
        self.id = uuid.uuid4().hex[:6]
        self._seq = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._reaping = False
        self._counts = {"submitted": 0, "completed": 0, "failed": 0, "forget_images": 0, "forget_failed": 0,
                        "restarts": 0, "retries": 0}
        self.last_error: str | None = None
        self._replicas = [_Replica(i) for i in range(replicas)]
        with self._lock:
            try:
                for r in self._replicas:
                    self._start(r)
            except BaseException:  # e.g. the weights could not be loaded: no replica is left holding a GPU
                for r in self._replicas:
                    if r.handle is not None:
                        ray.kill(r.handle)
                raise
        self._monitor = threading.Thread(target=self._watch, name=f"mesh-ray-vae-{self.id}", daemon=True)
        self._monitor.start()

    # -- replicas -----------------------------------------------------------------------------

    def _start(self, r: _Replica) -> None:
        if r.starts:
            self._counts["restarts"] += 1
            metrics.restart("vae_replica")
            log.info("starting VAE decoder replica %d again (start %d)", r.index, r.starts + 1)
            try:  # dead or leaving already; make sure no orphan keeps its GPU
                ray.kill(r.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        r.handle = VaeDecoderActor.options(num_gpus=self.num_gpus, num_cpus=self.num_cpus).remote(
            self.host, self.output_dir, self.idle_timeout_s, self.torch_threads, self.dtype, r.index,
            self.ship != "always", self.cache_dir)
        r.alive, r.starts, r.last_used = True, r.starts + 1, time.monotonic()
        if self.ship == "always" or not self.host.reads_file or (self.ship == "auto" and _nodes_alive() > 1):
            self._ensure_weights(r)

    def _ensure_weights(self, r: _Replica) -> None:
        """Ship the decoder weights to a replica that could not read the checkpoint on its node."""
        def get(ref: ray.ObjectRef, doing: str) -> Any:
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except Exception as e:
                raise decoder_error(e, f"VAE decoder replica {r.index} ({doing})", self.timeout_s) from None

        if get(r.handle.has_weights.remote(), "starting"):
            return
        if self.ship == "never":
            raise ClusterError(f"VAE decoder replica {r.index} cannot read {self.checkpoint} on its node and "
                               f"ship='never': copy the file there or use ship='auto'")
        if not self.host.reads_file:  # the host's tensors live in the caller's memory already: no copy kept here
            get(send_shard(r.handle, self.host.weights(), get), "loading the shipped weights")
            return
        if self._state is None:
            self._state = self.host.weights()
        get(send_shard(r.handle, self._state, get), "loading the shipped weights")

    def _probe_due(self, r: _Replica, now: float) -> bool:
        """Check an idle replica before sending it work: it may have exited on its idle timeout."""
        if r.in_flight:
            return False
        idle = now - r.last_used
        if self.idle_timeout_s is not None:
            return idle >= 0.5 * self.idle_timeout_s
        return idle >= 30.0

    def _acquire(self) -> _Replica:
        with self._lock:
            if self._closed:
                raise ClusterError("this VaeService is closed: create a new one (or use mesh.vae(...))")
            self._reap()
            now = time.monotonic()
            r = min(self._replicas, key=lambda x: (len(x.in_flight) if x.alive else 0, x.last_used))
            if r.alive and self._probe_due(r, now):
                try:
                    r.alive = bool(ray.get(r.handle.reserve.remote(), timeout=self.timeout_s))
                except RayActorError:
                    r.alive = False
                except Exception as e:
                    raise decoder_error(e, f"VAE decoder replica {r.index} (start-up check)", self.timeout_s) from None
            if not r.alive:
                self._start(r)
            r.last_used = time.monotonic()
            return r

    def _send(self, req: _Request) -> None:
        """Send ``req`` to the least-loaded replica and watch it (a first send or a re-send)."""
        with self._lock:
            r = self._acquire()
            req.status, req.result = req.send(r.handle)
            req.replica, req.handle, req.tries = r, r.handle, req.tries + 1
            if req.promise is not None:
                req.promise.ref = req.result
                req.promise.label = self._label(req)
            r.in_flight[req.status] = req
            self._counts["submitted"] += 1
            self._wake.notify_all()

    def _label(self, req: _Request) -> str:
        tried = f", try {req.tries} of {self.max_retries + 1}" if req.tries > 1 else ""
        return f"VAE {req.mode} decode on replica {req.replica.index}{tried}"

    def _resend(self, req: _Request, dead: ray.ObjectRef) -> ray.ObjectRef | None:
        """``dead`` (a ref of ``req``) failed because its actor died: the ref of the re-sent request,
        the current one when it was re-sent already, or None when the retries are spent."""
        with self._lock:
            if dead not in (req.status, req.result):
                return req.result  # another thread re-sent it already
            r = req.replica
            r.in_flight.pop(req.status, None)
            if r.handle is req.handle:
                r.alive = False  # start it again rather than send more work to a dead actor
            if req.spent:
                return None
            if req.tries > self.max_retries or self._closed:
                req.spent = True
                self._failed(r, req, ClusterError(
                    f"{self._label(req)} failed: its decoder actor died before returning, {req.tries} times: "
                    f"check the decoder logs (out of memory?), then decode again"))
                return None
            log.warning("VAE decoder replica %d died with a %s request in flight: sending it again", r.index, req.mode)
            self._counts["retries"] += 1
            metrics.retry("vae_decode")
            self._send(req)
            return req.result

    def _failed(self, r: _Replica, req: Any, err: Exception) -> None:
        """Count a failed request (lock held); a forget-mode failure, which nobody waits on, is logged."""
        r.failed += 1
        self._counts["failed"] += 1
        self.last_error = str(err)
        if req.mode == "forget":
            self._counts["forget_failed"] += 1
            log.warning("%s", err)

    def _reap(self) -> None:
        """Account for finished requests (lock held): counts, forget failures, dead actors (re-sent)."""
        refs = [ref for r in self._replicas for ref in r.in_flight]
        if not refs or self._reaping:  # a re-send from inside _reap must not reap again
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        ready_set = set(ready)
        self._reaping = True
        try:
            self._collect(ready_set)
        finally:
            self._reaping = False

    def _collect(self, ready_set: set) -> None:
        for r in self._replicas:
            for ref in [x for x in r.in_flight if x in ready_set]:
                req = r.in_flight.pop(ref, None)
                if req is None:
                    continue
                r.last_used = time.monotonic()
                try:
                    out = ray.get(ref, timeout=self.timeout_s)
                except Exception as e:
                    if actor_lost(e):
                        self._resend(req, ref)  # re-sent, or counted as failed when spent
                        continue
                    self._failed(r, req, decoder_error(e, self._label(req)))
                    continue
                r.completed += 1
                self._counts["completed"] += 1
                # Done: drop the request's links to its promise and result.  The promise holds its own
                # ref, and the request <-> promise cycle (its resubmit closure) would otherwise keep
                # every decoded image in the object store until Python's cycle collector ran.
                req.promise, req.result = None, None
                if req.mode == "forget":
                    self._counts["forget_images"] += len(out)

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                if not any(r.in_flight for r in self._replicas):
                    self._wake.wait(timeout=1.0)
                    continue
                try:
                    self._reap()
                except Exception as e:  # never let the monitor die; report it
                    log.warning("VAE service monitor: %s", e)
            time.sleep(0.05)

    # -- public -------------------------------------------------------------------------------

    def decode(self, latent: torch.Tensor | np.ndarray, mode: VaeMode = "wait",
               save: str | os.PathLike | None = None, metadata: Mapping[str, Any] | None = None,
               timeout: float | None = None, tile: int | None = None, overlap: int = 64, raw: bool = False,
               options: Mapping[str, Any] | None = None):
        """Decode a latent (FLUX: ``[B, C, h, w]``; a video VAE of ComfyUI: ``[B, C, F, h, w]``) on the
        least-loaded replica.

        * ``wait``: returns images ``[N, H, W, C]`` float 0..1 (video frames flattened); ``save``
          (path or directory) also writes them here as PNGs.
        * ``forget``: the actor writes ``{output_dir}/{save or 'mesh_ray'}_{id}_{k:02d}.png`` with
          ``metadata`` as PNG text (a host may write its own kind of file, e.g. a video); returns
          the request id at once.
        * ``promise``: returns a ``Promise`` at once; with ``save`` it also starts
          ``promise.save(save, metadata)`` (its handle is ``promise.saved``).

        ``tile``, ``overlap``, ``raw``: mesh-ray's FLUX decoder options; ``options``: the host's own
        decode options (``VaeHost``), checked here at once.  In every mode a request whose actor dies
        is sent again (``max_retries`` times).
        """
        if mode not in MODES:
            raise ConfigError(f"unknown decode mode {mode!r}: use one of {', '.join(MODES)}")
        arr = _as_numpy(latent)
        opts = {**flux_options(tile, overlap, raw), **(options or {})}  # a host refuses options it does not know
        self.host.check(arr.shape, opts)  # the actor checks too; here the caller gets it at once
        timeout = self.timeout_s if timeout is None else timeout
        if mode == "forget":
            prefix = check_prefix(str(save) if save is not None else "mesh_ray")
            request_id = f"{self.id}-{next(self._seq):05d}"
            meta = dict(metadata or {})

            def send_forget(h: Any) -> tuple[ray.ObjectRef, ray.ObjectRef]:
                ref = h.decode_and_save.remote(arr, prefix, request_id, meta, opts)
                return ref, ref

            self._send(_Request(mode, send_forget))
            return request_id
        req = _Request(mode, lambda h: tuple(h.decode.remote(arr, opts)))
        # The monitor watches the small status ref, never fetches images; the promise holds the images' ref.
        req.promise = Promise(None, timeout_s=timeout, resubmit=lambda dead: self._resend(req, dead))
        self._send(req)
        promise = req.promise
        if mode == "promise":
            promise.saved = promise.save(save, metadata) if save is not None else None
            return promise
        images = promise.result(timeout)
        if save is not None:
            save_images(images, save, metadata, stem=f"mesh_ray_{promise.id}")
        return images

    def drain(self, timeout: float | None = None) -> None:
        """Wait until no request is in flight (forget-mode writes included)."""
        timeout = self.timeout_s if timeout is None else timeout
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                self._reap()
                pending = sum(len(r.in_flight) for r in self._replicas)
            if not pending:
                return
            if time.monotonic() > end:
                raise ClusterError(f"{pending} VAE requests still running after {timeout:g} s: wait longer or add replicas")
            time.sleep(0.02)

    def actors(self) -> list:
        """Current actor handles, one per replica (a restarted replica gets a new handle)."""
        with self._lock:
            return [r.handle for r in self._replicas]

    def replica_info(self, timeout: float = 60.0) -> list[dict]:
        """``info()`` of every live replica (device, pid, threads, decoded count)."""
        out = []
        for i, h in enumerate(self.actors()):
            try:
                out.append(ray.get(h.info.remote(), timeout=timeout))
            except Exception as e:
                out.append({"replica": i, "error": str(decoder_error(e, f"replica {i} info", timeout))})
        return out

    def stats(self) -> dict:
        """Counters: submitted / completed / failed, forget images and failures, restarts, per replica."""
        with self._lock:
            self._reap()
            return {**self._counts, "in_flight": sum(len(r.in_flight) for r in self._replicas),
                    "last_error": self.last_error,
                    "replicas": [{"index": r.index, "alive": r.alive, "in_flight": len(r.in_flight),
                                  "completed": r.completed, "failed": r.failed, "starts": r.starts}
                                 for r in self._replicas]}

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (a new service is needed)."""
        return self._closed

    def close(self, wait: bool = True, timeout: float = 60.0) -> None:
        """Stop every replica (frees their GPUs); with ``wait``, in-flight work (forget-mode
        writes included) first gets up to ``timeout`` s to finish."""
        if wait and not self._closed:
            try:
                self.drain(timeout)
            except ClusterError as e:
                log.warning("closing the VAE service with work still running: %s", e)
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            for r in self._replicas:
                if r.handle is not None:
                    ray.kill(r.handle)
                r.alive = False

    def __enter__(self) -> "VaeService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MODES", "VaeService"]
