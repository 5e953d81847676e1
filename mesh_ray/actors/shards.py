"""Weights for a worker that cannot read the file: shipped once, cached on its node by content hash.

The driver reads the tensors, names them by ``shard_digest`` and asks the worker whether its
node already caches that digest; only when it does not are the tensors sent through Ray's object
store.  The worker writes what it received under ``{cache_dir}/{digest}.safetensors`` (atomic)
so later workers on that node (the next split, a restarted decoder) load it from disk, and
checks a cached file against its digest before trusting it.  Used by DiT stage actors and VAE
decoder actors alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from mesh_ray.errors import StageError
from mesh_ray.models.checkpoint import shard_digest

StateDict = dict[str, torch.Tensor]
RECEIVE_TIMEOUT_S = 600


def default_cache_dir() -> str:
    """``MESH_RAY_CACHE_DIR``, else ``~/.cache/mesh-ray/shards``."""
    return os.environ.get("MESH_RAY_CACHE_DIR") or str(Path.home() / ".cache" / "mesh-ray" / "shards")


class ShardCache:
    """The worker side: a directory of ``{digest}.safetensors`` files on this node."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.dir = Path(cache_dir or default_cache_dir())

    def path(self, digest: str) -> Path:
        return self.dir / f"{digest}.safetensors"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def load(self, digest: str, read: Callable[[Path], StateDict], owner: str) -> StateDict:
        """Read a cached shard with ``read`` and check it against its digest (a bad file is removed)."""
        sd = read(self.path(digest))
        if shard_digest(sd) != digest:
            self.path(digest).unlink(missing_ok=True)
            raise StageError(f"{owner}: cached shard {digest} is corrupt and was removed: "
                             f"create it again to re-send the weights")
        return sd

    def receive(self, digest: str, box: list, write: Callable[[StateDict, Path], Any]) -> StateDict:
        """Fetch shipped tensors (``box`` = [ObjectRef]) and cache them with ``write`` (atomic)."""
        sd = ray.get(box[0], timeout=RECEIVE_TIMEOUT_S)
        if not self.has(digest):
            write(sd, self.path(digest))
        return sd


def send_shard(actor: Any, sd: StateDict, get: Callable[[Any, str], Any]) -> Any:
    """Driver side: ``actor.load_from_cache`` when its node has the digest, else ship ``sd`` once.

    ``actor`` has ``has_cached_shard(digest)``, ``load_from_cache(digest)`` and
    ``load_from_shard(digest, box)``; ``get(ref, doing)`` waits on a ref with the caller's timeout
    and error wording.  Returns the ref of the load call.
    """
    digest = shard_digest(sd)
    if get(actor.has_cached_shard.remote(digest), "checking its shard cache"):
        return actor.load_from_cache.remote(digest)
    return actor.load_from_shard.remote(digest, [ray.put(sd)])


__all__ = ["ShardCache", "default_cache_dir", "send_shard"]
