"""VAE decoder actor: one VAE decoder pinned to a GPU (CPU when the cluster has none).

The actor hosts its decoder through ``VaeHost`` (``mesh_ray.actors.vae_host``): mesh-ray's own
FLUX VAE (``FluxVaeHost``, from a file) or ComfyUI's own VAE class
(``comfy_integration.vae_host.ComfyVaeHost``).  Placement is chosen at creation, as in Ray's own
examples::

    actor = VaeDecoderActor.options(num_gpus=1, num_cpus=1).remote(host, output_dir="out")

Public methods (the actor's API):
  * ``decode(latent, options, as_uint8)`` -> two refs: a small status dict and the decoded numpy
    (images ``[N, H, W, C]`` float 0..1, video frames flattened; or uint8 0..255);
  * ``decode_and_save(latent, prefix, request_id, metadata, options)`` -> paths of the files the
    host wrote under the actor's output directory (PNGs with text metadata, or a video);
  * ``info()``, ``reserve()`` (control group: answered even while a decode runs);
  * ``has_weights()``, ``has_cached_shard(digest)``, ``load_from_cache(digest)``,
    ``load_from_shard(digest, box)``: a decoder on a node that cannot read the file (or a host
    that never reads files) gets the tensors shipped once, cached on its node by content hash
    (``mesh_ray.actors.shards``, the same mechanism as DiT stage shards).

Decodes run one at a time (the default concurrency group); ``info`` / ``reserve`` /
``exit_if_idle`` run in a small ``control`` group beside them.  With ``idle_timeout_s`` the actor
exits on its own after that long without work, which frees its GPU; ``reserve()`` (called by the
service before it sends work to a replica that has been idle a while) resets the idle clock or
answers False when the actor is already leaving, so no request is sent to an exiting actor.

Files are written atomically (temporary name, then rename) by the host.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import ray
import torch

from mesh_ray.actors.shards import ShardCache
from mesh_ray.actors.vae_host import FluxVaeHost, VaeHost
from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.cluster import metrics
from mesh_ray.models.images import remove_stale_tmp, to_uint8

log = logging.getLogger("mesh_ray.vae")

CONTROL_GROUP = "control"


def check_prefix(prefix: str) -> str:
    """A file-name prefix relative to an output directory (sub-folders allowed, no escape)."""
    p = Path(prefix)
    if not prefix or p.is_absolute() or ".." in p.parts:
        raise ConfigError(f"save prefix {prefix!r} must be a relative name inside the output directory: "
                          f"use e.g. 'portraits/img' (no leading '/', no '..')")
    return prefix


# --------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------


@ray.remote(concurrency_groups={CONTROL_GROUP: 2})
class VaeDecoderActor:
    """A VAE decoder replica: hosts one decoder through ``VaeHost`` (``mesh_ray.actors.vae_host``).

    Args:
      host: the decoder to host (a ``VaeHost``, or the path of a FLUX VAE safetensors file: mesh-ray's own decoder).
      output_dir: where ``decode_and_save`` writes (created when needed).
      idle_timeout_s: exit after this many seconds without work (None: never).
      torch_threads: ``torch.set_num_threads`` for this process (None: leave Ray's default).
      dtype: ``auto`` or an explicit float type (the host applies it: mesh-ray's rule, or ComfyUI's own).
      read_file: load from the host's file when this node can read it (False: wait for shipped weights).
      cache_dir: where shipped weights are cached on this node (default ``MESH_RAY_CACHE_DIR``).
    """

    def __init__(self, host: VaeHost | str, output_dir: str = "outputs/vae", idle_timeout_s: float | None = None,
                 torch_threads: int | None = None, dtype: str = "auto", replica: int = 0, read_file: bool = True,
                 cache_dir: str | None = None):
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.host: VaeHost = FluxVaeHost(host) if isinstance(host, (str, os.PathLike)) else host
        self.dtype = dtype
        self.weights_source = "none"
        self._cache = ShardCache(cache_dir)
        if read_file and self.host.reads_file and self.host.can_read_file():
            self.host.load_file(dtype)
            self.weights_source = "file"
        self.output_dir = Path(output_dir)
        self.replica = replica
        self.idle_timeout_s = idle_timeout_s
        self.started = time.time()
        self._lock = threading.Lock()
        self._busy = 0
        self._last = time.monotonic()
        self._closing = False
        self._exit_asked = False
        self._decoded = 0
        if idle_timeout_s:
            self._self = ray.get_runtime_context().current_actor
            threading.Thread(target=self._watch_idle, name="vae-idle", daemon=True).start()

    # -- weights ------------------------------------------------------------------------------

    def has_weights(self) -> bool:
        return self.host.loaded()

    def has_cached_shard(self, digest: str) -> bool:
        return self._cache.has(digest)

    def _loading(self, load: Callable[[], dict], source: str) -> dict:
        """Load weights as work: the idle clock neither runs out nor starts during a slow load."""
        with self._lock:
            self._busy += 1
        try:
            self.host.load_weights(load(), self.dtype)
            self.weights_source = source
        finally:
            with self._lock:
                self._busy -= 1
                self._last = time.monotonic()
        return {"replica": self.replica, "source": source, "node": ray.get_runtime_context().get_node_id()}

    def load_from_cache(self, digest: str) -> dict:
        """Load decoder weights this node cached earlier under ``digest`` (checked against it)."""
        return self._loading(lambda: self._cache.load(digest, self.host.read_cached,
                                                      f"VAE decoder replica {self.replica}"), "cache")

    def load_from_shard(self, digest: str, shard_box: list) -> dict:
        """Load decoder weights sent through the object store (``shard_box`` = [ObjectRef]) and cache them."""
        return self._loading(lambda: self._cache.receive(digest, shard_box, self.host.write_cached), "object_store")

    # -- control ------------------------------------------------------------------------------

    @ray.method(concurrency_group=CONTROL_GROUP)
    def info(self) -> dict:
        with self._lock:
            busy, last = self._busy, self._last
        return {"replica": self.replica, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                **self.host.describe(), "vae": self.host.label, "gpu_ids": ray.get_gpu_ids(), "busy": busy,
                "idle_s": time.monotonic() - last, "decoded": self._decoded, "torch_threads": torch.get_num_threads(),
                "idle_timeout_s": self.idle_timeout_s, "weights_source": self.weights_source}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def reserve(self) -> bool:
        """Reset the idle clock; False when the actor has already decided to exit."""
        with self._lock:
            if self._closing:
                return False
            self._last = time.monotonic()
            return True

    @ray.method(concurrency_group=CONTROL_GROUP)
    def exit_if_idle(self) -> bool:
        """Exit (freeing the GPU) when still idle past the timeout; False when work came in."""
        with self._lock:
            idle = self._busy == 0 and time.monotonic() - self._last >= (self.idle_timeout_s or float("inf"))
            if not idle:
                self._exit_asked = False
                return False
            self._closing = True
        log.info("VAE decoder replica %s idle for %.1f s: exiting to free %s", self.replica, self.idle_timeout_s,
                 self.host.describe().get("device"))
        self.host.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ray.actor.exit_actor()
        return True  # not reached

    def _watch_idle(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout_s / 5))
        while True:
            time.sleep(period)
            with self._lock:
                if self._closing:
                    return
                due = (not self._exit_asked and self._busy == 0
                       and time.monotonic() - self._last >= self.idle_timeout_s)
                if due:
                    self._exit_asked = True
            if due:  # exit_actor must run inside an actor task, so ask ourselves
                self._self.exit_if_idle.remote()

    # -- work ---------------------------------------------------------------------------------

    def _begin(self) -> None:
        if not self.host.loaded():
            raise ClusterError(f"VAE decoder replica {self.replica} has no weights for {self.host.label}: its node "
                               f"cannot read the file: copy it there or let the service ship it (ship='auto')")
        with self._lock:
            if self._closing:
                raise ClusterError(f"VAE decoder replica {self.replica} is exiting after its idle timeout: "
                                   f"send the latent again (the service starts a new replica)")
            self._busy += 1
            self._last = time.monotonic()

    def _end(self) -> None:
        with self._lock:
            self._busy -= 1
            self._last = time.monotonic()
            self._decoded += 1

    def _decode(self, latent: np.ndarray, options: Mapping[str, Any] | None) -> torch.Tensor:
        options = dict(options or {})
        x = torch.from_numpy(np.array(latent, copy=True))
        self.host.check(tuple(x.shape), options)
        return self.host.decode(x, options)

    @ray.method(num_returns=2)
    def decode(self, latent: np.ndarray, options: Mapping[str, Any] | None = None,
               as_uint8: bool = False) -> tuple[dict, np.ndarray]:
        """Latent -> (status, decoded ``numpy``): images ``[N, H, W, C]`` 0..1 (video frames flattened, as
        ComfyUI's VAEDecode gives them; uint8 with ``as_uint8``), or what an audio VAE gives.

        Two returns: the small status lets a caller learn that the decode finished (or failed)
        without fetching the output: ``status_ref, out_ref = actor.decode.remote(latent)``.
        """
        self._begin()
        try:
            t0 = time.perf_counter()
            images = self._decode(latent, options)
            out = to_uint8(images) if as_uint8 else images.numpy()
            ms = (time.perf_counter() - t0) * 1000
            metrics.vae_decode(ms, "decode")
            return {"replica": self.replica, "ms": ms, "shape": out.shape}, out
        finally:
            self._end()

    def decode_and_save(self, latent: np.ndarray, prefix: str = "mesh_ray", request_id: str = "0",
                        metadata: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None) -> list[str]:
        """Decode and write under ``{output_dir}/{prefix}_{request_id}``: ``_{k:02d}.png`` per image, or
        the host's own file (a video) (a re-sent request first removes what a killed predecessor left half-written)."""
        self._begin()
        try:
            t0 = time.perf_counter()
            images = self._decode(latent, options)
            metrics.vae_decode((time.perf_counter() - t0) * 1000, "decode_and_save")
            target = self.output_dir / check_prefix(prefix)
            remove_stale_tmp(target.parent, f"{target.name}_{request_id}")
            written = self.host.save(images, target.parent, f"{target.name}_{request_id}", metadata, dict(options or {}))
            return [str(p) for p in written]
        finally:
            self._end()


__all__ = ["VaeDecoderActor", "check_prefix"]
