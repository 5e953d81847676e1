"""Promise: the handle of a decode that is still running on a VAE decoder actor.

``Promise.result(timeout)`` returns the images (``[B, H, W, C]`` float 0..1, a torch tensor);
``Promise.save(path_or_dir)`` returns a ``SaveHandle`` at once and writes the PNGs from a
background thread when the images are ready, so the caller never blocks on it.  Errors (the
decoder died, timed out or raised) surface from ``result`` and from the save handle's own
``result()``; a failed promise writes nothing, so no half file is ever left.  A promise made by
the VAE service is re-sent to another (or a restarted) replica when its decoder actor dies.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from mesh_ray.models.images import save_images
from mesh_ray.config import VaeOptions
from mesh_ray.errors import ClusterError, MeshError
from mesh_ray.cluster.ray_errors import ray_error

DEFAULT_TIMEOUT_S: float = VaeOptions.model_fields["timeout_s"].default


def decoder_error(e: BaseException, label: str, timeout: float | None = None) -> MeshError:
    """A Ray failure while waiting on decoder work ``label`` -> a one-line MeshError (``rayutil.ray_error``)."""
    return ray_error(e, label, timeout,
                     timeout_fix="wait longer (timeout=...) or add decoder replicas; service.stats() shows the queue",
                     died_fix="the decoder was killed, ran out of memory or exited; the service starts a new "
                              "replica on the next request; decode this latent again",
                     failed_fix="check the latent and the VAE checkpoint")


def actor_lost(e: BaseException) -> bool:
    """True when a Ray error means the worker (or its node) died, so the same call may succeed elsewhere."""
    return isinstance(e, (RayActorError, ObjectLostError))


class _Writers:
    """Daemon threads that run deferred saves: an idle one is reused, a new one starts when all are
    busy (a save never waits behind another), one idle for ``idle_s`` exits.

    Why not a thread per save: each new thread takes whichever glibc malloc arena is free, and the
    decoded images it allocates leave free holes in many arenas; a soak of promise decodes then
    kept 13-25 MB free in the allocator (driver RSS swinging by +-1 %) against 4-6 MB when the same
    saves ran on one thread (docs/benchmarks.md).
    """

    def __init__(self, idle_s: float = 30.0):
        self.idle_s = idle_s
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job, less the jobs queued for them
        self._seq = itertools.count()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                self._jobs.put(job)
                return
        # handed over in a list the thread empties: a Thread keeps its args until it ends, and a job
        # holds its promise (and the images) alive
        threading.Thread(target=self._work, args=([job],), name=f"mesh-ray-save-{next(self._seq)}",
                         daemon=True).start()

    def _work(self, first: list) -> None:
        job: Callable[[], None] | None = first.pop()
        while True:
            job()  # the jobs catch their own errors (Promise.save's run)
            job = None  # let the promise go before waiting for the next job
            with self._lock:
                self._idle += 1
            while job is None:
                try:
                    job = self._jobs.get(timeout=self.idle_s)
                except queue.Empty:
                    with self._lock:
                        if self._jobs.empty():
                            self._idle -= 1
                            return


_WRITERS = _Writers()


class SaveHandle:
    """Handle of a deferred save: ``done()``, ``result(timeout)`` -> list of written paths."""

    def __init__(self, future: cf.Future, label: str, timeout_s: float):
        self._future = future
        self._label = label
        self._timeout_s = timeout_s

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn: Callable[["SaveHandle"], Any]) -> None:
        """Call ``fn(handle)`` from the writer thread once the save finished or failed (at once if it has)."""
        self._future.add_done_callback(lambda _f: fn(self))

    def result(self, timeout: float | None = None) -> list[Path]:
        """The written paths; raises the promise's error or the write error (one line)."""
        timeout = self._timeout_s if timeout is None else timeout
        try:
            return self._future.result(timeout=timeout)
        except cf.TimeoutError:
            raise ClusterError(f"{self._label} was not written within {timeout:g} s: wait longer "
                               f"(result(timeout=...)) or check service.stats()") from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except MeshError as e:
            return e
        return None


class Promise:
    """Images that a decoder actor is still producing (wraps the Ray ObjectRef)."""

    def __init__(self, ref: ray.ObjectRef, label: str = "VAE decode", timeout_s: float = DEFAULT_TIMEOUT_S,
                 resubmit: Callable[[ray.ObjectRef], ray.ObjectRef | None] | None = None):
        self.ref = ref
        # resubmit(dead_ref) -> the ref of the same decode sent again (or already re-sent), None when spent
        self._resubmit = resubmit
        self.label = label
        self.timeout_s = timeout_s
        self.id = uuid.uuid4().hex[:10]
        self._lock = threading.Lock()
        self._images: torch.Tensor | None = None
        self._error: MeshError | None = None
        self.actor_died = False  # the decoder actor died before returning (set by result())
        self.saved: SaveHandle | None = None  # set by VaeService.decode(..., mode="promise", save=...)

    def __repr__(self) -> str:
        return f"Promise({self.label}, {'done' if self.done() else 'pending'})"

    @classmethod
    def kept(cls, images: torch.Tensor, label: str = "VAE decode (done)") -> "Promise":
        """A promise already kept with ``images`` (wait mode): nothing is put in the object store again."""
        p = cls(None, label=label)
        p._images = images
        return p

    def done(self) -> bool:
        """True once the images (or an error) are ready; never blocks."""
        if self._images is not None or self._error is not None:
            return True
        ready, _ = ray.wait([self.ref], num_returns=1, timeout=0, fetch_local=False)
        return bool(ready)

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """Images ``[B, H, W, C]`` float32 0..1; waits at most ``timeout`` s (default: the service's)."""
        timeout = self.timeout_s if timeout is None else timeout
        with self._lock:
            if self._images is not None:
                return self._images
            if self._error is not None:
                raise type(self._error)(str(self._error))
        end = time.monotonic() + timeout
        while True:
            ref = self.ref
            try:
                arr = ray.get(ref, timeout=max(0.0, end - time.monotonic()))
                break
            except GetTimeoutError as e:  # not final: a later call may still succeed
                raise decoder_error(e, self.label, timeout) from None
            except Exception as e:
                again = self._resubmit(ref) if self._resubmit is not None and actor_lost(e) else None
                if again is not None:
                    self.ref = again  # the same decode, on another or a restarted replica
                    continue
                err = decoder_error(e, self.label, timeout)
                with self._lock:
                    self.actor_died = actor_lost(e)
                    self._error = err
                raise type(err)(str(err)) from None
        images = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        with self._lock:
            self._images = images
        return images

    def save(self, path_or_dir: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
             timeout: float | None = None) -> SaveHandle:
        """Return at once; a background thread writes the PNGs (atomically) when the images are ready.

        A directory gets ``mesh_ray_{promise id}_{k:02d}.png``; a file path is used as is (for a
        batch: ``name_{k:02d}.png``).  Nothing is written when the promise fails.
        """
        timeout = self.timeout_s if timeout is None else timeout
        target = Path(path_or_dir)
        return defer(lambda: save_images(self.result(timeout), target, metadata, stem=f"mesh_ray_{self.id}"),
                     f"save of {self.label} to {target}", timeout)


def defer(write: Callable[[], list[Path]], label: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> SaveHandle:
    """Run ``write`` (which waits on promises and writes files, returning their paths) on the deferred-save
    threads; returns its ``SaveHandle`` at once.  Errors reach the handle as one-line MeshErrors."""
    future: cf.Future = cf.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(write())
        except MeshError as e:
            future.set_exception(e)
        except Exception as e:  # anything else still reaches the handle, on one line
            future.set_exception(MeshError(f"{label} failed ({type(e).__name__}: {e})"))

    _WRITERS.submit(run)
    return SaveHandle(future, label, timeout_s + 60.0)


def save_promised(promises: Iterable[Promise], directory: str | os.PathLike,
                  metadata: Mapping[str, Any] | None = None) -> list[SaveHandle]:
    """"Save Promised Image": ``promise.save(directory, metadata)`` for each; returns at once."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [p.save(directory, metadata) for p in promises]


__all__ = ["Promise", "SaveHandle", "actor_lost", "decoder_error", "defer", "save_promised"]
