"""Which clients of the workflow service are still connected.

A client puts one tiny object in Ray's object store and hands the service its ref (``attach``).
The client's driver owns that object, so when the driver exits, crashes or loses its node, Ray
reports the owner as dead (``OwnerDiedError``) to whoever holds the ref.  No heartbeat of our own.
"""

from __future__ import annotations

import threading
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

LEASE_CHECK_S = 1.0  # how often the service checks its clients


class ClientLeases:
    """The lease ref of every attached client (thread-safe)."""

    def __init__(self) -> None:
        self._refs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def attach(self, client_id: str, box: list) -> None:
        """Remember ``box[0]``, an ObjectRef the client's driver owns (a list, so Ray passes the ref itself)."""
        with self._lock:
            self._refs[client_id] = box[0]

    def clients(self) -> list[str]:
        with self._lock:
            return list(self._refs)

    def gone(self, timeout_s: float = 5.0) -> list[str]:
        """Clients whose driver has died since the last check (each is reported once and forgotten)."""
        with self._lock:
            items = list(self._refs.items())
        dead = []
        for client, ref in items:
            try:
                ray.get(ref, timeout=timeout_s)
            except GetTimeoutError:
                continue  # cannot tell yet: ask again next time
            except RayError:  # OwnerDiedError, or the object lost with the client's node
                dead.append(client)
        old = dict(items)
        with self._lock:
            for client in dead:
                if self._refs.get(client) is old[client]:  # not re-attached meanwhile
                    self._refs.pop(client, None)
        return dead


def new_lease(client_id: str) -> list:
    """The box a client sends to ``attach``: a ref to a tiny object this driver owns."""
    return [ray.put(client_id)]


__all__ = ["LEASE_CHECK_S", "ClientLeases", "new_lease"]
