"""VAE decoder actor: one FLUX VAE decoder pinned to a GPU (CPU when the cluster has none).

Placement is chosen at creation, as in Ray's own examples::

    actor = VaeDecoderActor.options(num_gpus=1, num_cpus=1).remote(checkpoint, output_dir="out")

Public methods (the actor's API):
  * ``decode(latent, tile, overlap, raw, as_uint8)`` -> two refs: a small status dict and numpy
    ``[B, H, W, C]`` float32 0..1 (or uint8 0..255);
  * ``decode_and_save(latent, prefix, request_id, metadata, tile, overlap, raw)`` -> paths of the
    PNGs written under the actor's output directory (with text metadata);
  * ``info()``, ``reserve()`` (control group: answered even while a decode runs);
  * ``has_weights()``, ``has_cached_shard(digest)``, ``load_from_cache(digest)``,
    ``load_from_shard(digest, box)``: a decoder on a node that cannot read the checkpoint gets the
    decoder tensors shipped once, cached on its node by content hash (``mesh_ray.actors.shards``,
    the same mechanism as DiT stage shards).

Decodes run one at a time (the default concurrency group); ``info`` / ``reserve`` /
``exit_if_idle`` run in a small ``control`` group beside them.  With ``idle_timeout_s`` the actor
exits on its own after that long without work, which frees its GPU; ``reserve()`` (called by the
service before it sends work to a replica that has been idle a while) resets the idle clock or
answers False when the actor is already leaving, so no request is sent to an exiting actor.

PNGs are written with ``mesh_ray.models.images`` (atomic: temporary name, then rename).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray
import torch

from mesh_ray.actors.device import pick_device
from mesh_ray.actors.shards import ShardCache
from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.cluster import metrics
from mesh_ray.models.images import remove_stale_tmp, save_images, to_uint8

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
    """A FLUX VAE decoder replica.

    Args:
      checkpoint: path of the VAE safetensors file on the actor's node (decoder keys are read).
      output_dir: where ``decode_and_save`` writes (created when needed).
      idle_timeout_s: exit after this many seconds without work (None: never).
      torch_threads: ``torch.set_num_threads`` for this process (None: leave Ray's default).
      dtype: ``auto`` (bf16 on GPU, fp32 on CPU) or an explicit float type.
      read_file: load ``checkpoint`` when this node can read it (False: wait for shipped weights).
      cache_dir: where shipped weights are cached on this node (default ``MESH_RAY_CACHE_DIR``).
      config: the ``VaeConfig`` of the checkpoint (used for shipped weights).
    """

    def __init__(self, checkpoint: str, output_dir: str = "outputs/vae", idle_timeout_s: float | None = None,
                 torch_threads: int | None = None, dtype: str = "auto", replica: int = 0, read_file: bool = True,
                 cache_dir: str | None = None, config: Any = None):
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.device, self.dtype = pick_device(dtype)
        self.model = None
        self.arch = None
        self.weights_source = "none"
        self._cache = ShardCache(cache_dir)
        self._config = config  # VaeConfig from the driver: needed only for shipped weights
        self.checkpoint = checkpoint
        if read_file and self.can_read_checkpoint():
            from mesh_ray.models.vae import load_vae

            self._install(load_vae(checkpoint, device=self.device, dtype=self.dtype), "file")
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

    def _install(self, model: Any, source: str) -> None:
        self.model, self.arch, self.weights_source = model, model.config.arch, source

    def can_read_checkpoint(self) -> bool:
        return os.path.isfile(self.checkpoint) and os.access(self.checkpoint, os.R_OK)

    def has_weights(self) -> bool:
        return self.model is not None

    def has_cached_shard(self, digest: str) -> bool:
        return self._cache.has(digest)

    def _from_state(self, sd: dict, source: str) -> dict:
        from mesh_ray.models.vae import vae_from_state

        self._install(vae_from_state(sd, self._config, self.device, self.dtype, where=f"shipped {self.checkpoint}"),
                      source)
        return {"replica": self.replica, "source": source, "node": ray.get_runtime_context().get_node_id()}

    def load_from_cache(self, digest: str) -> dict:
        """Load decoder weights this node cached earlier under ``digest`` (checked against it)."""
        from mesh_ray.models.vae import load_vae_state

        return self._from_state(self._cache.load(digest, load_vae_state, f"VAE decoder replica {self.replica}"), "cache")

    def load_from_shard(self, digest: str, shard_box: list) -> dict:
        """Load decoder weights sent through the object store (``shard_box`` = [ObjectRef]) and cache them."""
        from mesh_ray.models.vae import save_vae_state

        sd = self._cache.receive(digest, shard_box, lambda t, path: save_vae_state(t, path, self._config))
        return self._from_state(sd, "object_store")

    # -- control ------------------------------------------------------------------------------

    @ray.method(concurrency_group=CONTROL_GROUP)
    def info(self) -> dict:
        with self._lock:
            busy, last = self._busy, self._last
        return {"replica": self.replica, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "arch": self.arch, "gpu_ids": ray.get_gpu_ids(), "busy": busy,
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
                 self.device)
        self.model = None
        if self.device.type == "cuda":
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
        if self.model is None:
            raise ClusterError(f"VAE decoder replica {self.replica} has no weights: it cannot read {self.checkpoint} "
                               f"on its node: copy the file there or let the service ship it (ship='auto')")
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

    def _decode(self, latent: np.ndarray, tile: int | None, overlap: int, raw: bool) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(latent, dtype=np.float32).copy())
        return self.model.decode(x, tile=tile, overlap=overlap, raw=raw).cpu()

    @ray.method(num_returns=2)
    def decode(self, latent: np.ndarray, tile: int | None = None, overlap: int = 64, raw: bool = False,
               as_uint8: bool = False) -> tuple[dict, np.ndarray]:
        """Latent ``[B, C, h, w]`` -> (status, images ``[B, H, W, C]`` float32 0..1 or uint8).

        Two returns: the small status lets a caller learn that the decode finished (or failed)
        without fetching the images: ``status_ref, images_ref = actor.decode.remote(latent)``.
        """
        self._begin()
        try:
            t0 = time.perf_counter()
            images = self._decode(latent, tile, overlap, raw)
            out = to_uint8(images) if as_uint8 else images.numpy()
            ms = (time.perf_counter() - t0) * 1000
            metrics.vae_decode(ms, "decode")
            return {"replica": self.replica, "ms": ms, "shape": out.shape}, out
        finally:
            self._end()

    def decode_and_save(self, latent: np.ndarray, prefix: str = "mesh_ray", request_id: str = "0",
                        metadata: Mapping[str, Any] | None = None, tile: int | None = None, overlap: int = 64,
                        raw: bool = False) -> list[str]:
        """Decode and write ``{output_dir}/{prefix}_{request_id}_{k:02d}.png`` for each image
        (a re-sent request first removes what a killed predecessor left half-written)."""
        self._begin()
        try:
            t0 = time.perf_counter()
            images = self._decode(latent, tile, overlap, raw)
            metrics.vae_decode((time.perf_counter() - t0) * 1000, "decode_and_save")
            target = self.output_dir / check_prefix(prefix)
            remove_stale_tmp(target.parent, f"{target.name}_{request_id}")
            written = save_images(images, target.parent, metadata, stem=f"{target.name}_{request_id}", as_dir=True)
            return [str(p) for p in written]
        finally:
            self._end()


__all__ = ["VaeDecoderActor", "check_prefix"]
