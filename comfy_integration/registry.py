"""What MeshSplitFlux built, for the status light (bridge2 owns the full version with ``GET /mesh/status``).

Minimal stand-in with the agreed API: ``record_split(key, split, address, plan, error)``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

_lock = threading.Lock()
_entries: dict[str, dict] = {}


def record_split(key: str, split: Any, address: str, plan: str, error: str | None = None) -> None:
    """Remember what a MeshSplitFlux node built (``split`` None with ``error`` when the build failed)."""
    with _lock:
        _entries[str(key)] = {"split": split, "address": address, "plan": plan, "error": error,
                              "recorded": time.time()}


def entries() -> dict[str, dict]:
    """A copy of what was recorded, by node key."""
    with _lock:
        return dict(_entries)
