"""Content hashes of tensors: the one way mesh-ray keys caches by tensor contents."""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

import torch


def tensor_digest(items: Iterable[tuple[str, torch.Tensor]], size: int = 16) -> str:
    """blake2b over each (name, dtype, shape) and the raw bytes, in the given order."""
    h = hashlib.blake2b(digest_size=size)
    for name, t in items:
        t = t.detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
