"""Synthetic node types for tests, examples and benchmarks (memory, digests, sleeps, failures, expansion).

Not built in: a graph uses them only when it names this module (``node_modules=["mesh_ray.workflow.testing_nodes"]``,
``mesh-ray run --nodes mesh_ray.workflow.testing_nodes``); see ``mesh_ray.workflow.modules``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from mesh_ray.errors import ConfigError
from mesh_ray.workflow.registry import Expansion, node


@node("AllocateMemory", outputs=("DATA", "DIGEST"))
def allocate_memory(bytes: int, seed: int = 0, after: Any = None) -> tuple[np.ndarray, str]:
    """Hold ``bytes`` bytes (filled from ``seed``), like the release PR's AllocateVRAM; ``after`` only orders it."""
    if not isinstance(bytes, int) or bytes < 0:
        raise ConfigError(f"AllocateMemory bytes={bytes!r} is invalid: use a whole number of bytes >= 0")
    data = np.full(bytes, seed % 251, dtype=np.uint8)
    return data, f"{bytes}:{seed}"


@node("Checksum", outputs=("DIGEST",), output=True)
def checksum(data: Any, extra: Any = None) -> str:
    """A short digest of ``data`` (and ``extra``): a small, comparable output."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(data).view(np.uint8).tobytes() if isinstance(data, np.ndarray) else repr(data).encode())
    h.update(repr(extra).encode())
    return h.hexdigest()


@node("Passthrough", outputs=("VALUE",))
def passthrough(value: Any) -> Any:
    """Return the input unchanged."""
    return value


@node("ExpandLink", outputs=("VALUE",))
def expand_link(node: str, output: int = 0, after: Any = None) -> Expansion:
    """Expand at run time into a Passthrough of output ``output`` of node ``node`` (which may have been released)."""
    return Expansion({"pass": {"class_type": "Passthrough", "inputs": {"value": [str(node), int(output)]}}},
                     result=[["pass", 0]])


@node("Fail", outputs=("VALUE",), cache=False)
def fail(message: str = "this node always fails", after: Any = None) -> Any:
    """Raise ``RuntimeError(message)``: for testing failure handling."""
    raise RuntimeError(message)


@node("Sleep", outputs=("VALUE",), cache=False)
def sleep(seconds: float, value: Any = None, progress: Any = None) -> Any:
    """Wait ``seconds`` (reporting progress every 0.1 s) and return ``value``."""
    steps = max(1, int(seconds / 0.1))
    for i in range(steps):
        time.sleep(seconds / steps)
        progress(i + 1, steps)
    return value


@node("EmptyImage", outputs=("IMAGE",))
def empty_image(width: int = 64, height: int = 64, batch: int = 1, color: float = 0.5) -> np.ndarray:
    """Images [batch, height, width, 3] of one grey level (0..1), e.g. to test saving."""
    return np.full((batch, height, width, 3), float(color), dtype=np.float32)
