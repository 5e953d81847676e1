"""One mesh-ray connection per ComfyUI process, shared by every MeshConnect node and queue.

The same address and namespace give back the same ``Mesh``; another address first probes the new
cluster (an unreachable one fails within the timeout and leaves the current connection alone),
then closes what this process built on the old one and reconnects.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import ray

from mesh_ray import Mesh, connect
from mesh_ray.cluster_access import probe_tcp

_lock = threading.Lock()


@dataclass
class _Current:
    key: tuple[str, str]
    mesh: Mesh
    owns_ray: bool  # this module started or joined Ray (else Ray was already up in this process)


_current: _Current | None = None


def mesh_for(address: str = "", namespace: str = "", timeout_s: float = 30.0) -> Mesh:
    """The process's Mesh for ``address`` ("" embedded, "auto", "host:port"), reused across queues."""
    global _current
    address, namespace = address.strip(), namespace.strip() or "mesh-ray"
    key = (address, namespace)
    with _lock:
        if _current is not None and _current.key == key and ray.is_initialized():
            return _current.mesh
        if address and address != "auto":
            probe_tcp(address, timeout_s)  # fail fast, before dropping a working connection
        if _current is not None and ray.is_initialized() and _current.owns_ray:
            _current.mesh.close()
            ray.shutdown()
        already_up = ray.is_initialized()
        mesh = connect(address or None, namespace=namespace, timeout_s=timeout_s)
        _current = _Current(key, mesh, owns_ray=not already_up)
        return mesh


def current() -> Mesh | None:
    """The connection made so far in this process, if any."""
    return _current.mesh if _current is not None else None
