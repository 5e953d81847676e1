"""Content hashes of tensors and files: the one way mesh-ray keys caches by contents."""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable

import torch


def tensor_digest(items: Iterable[tuple[str, torch.Tensor]], size: int = 16) -> str:
    """blake2b over each (name, dtype, shape) and the raw bytes, in the given order."""
    h = hashlib.blake2b(digest_size=size)
    for name, t in items:
        t = t.detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself (0-d too): no copy of the bytes
    return h.hexdigest()


def file_digest(path: str, size: int = 16, block: int = 8 << 20) -> str:
    """blake2b over a file's bytes, read in blocks (model files shipped to ComfyUI workers are keyed by it)."""
    h = hashlib.blake2b(digest_size=size)
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


class DigestMemo:
    """``key(t)`` for a tensor that equals one seen recently without hashing it again (an equality
    check reads the bytes once; blake2b is several times slower).  Exact: equal contents, same key."""

    def __init__(self, key: Callable[[torch.Tensor], str], keep: int = 4):
        self._key, self._keep = key, keep
        self._seen: list[tuple[torch.Tensor, str]] = []

    def __call__(self, t: torch.Tensor) -> str:
        for i, (old, k) in enumerate(self._seen):
            if old.shape == t.shape and old.dtype == t.dtype and old.device == t.device and torch.equal(old, t):
                self._seen.insert(0, self._seen.pop(i))
                return k
        k = self._key(t)
        self._seen.insert(0, (t.clone(), k))  # a copy: the caller may reuse its tensor for other contents
        del self._seen[self._keep:]
        return k
