"""One mesh-ray connection per ComfyUI process, shared by every MeshConnect node and queue.

The same address and namespace give back the same ``Mesh``; another address first probes the new
cluster (an unreachable one fails within the timeout and leaves the current connection alone),
then closes what this process built on the old one and reconnects.

A cluster joined by address may go away and come back while ComfyUI runs.  Ray kills a driver
whose GCS stays away longer than ``gcs_rpc_server_reconnect_timeout_s`` (60 s), or that touches
the object store of its dead node; so this process joins with that timeout raised, and
``live_mesh`` checks the node before each remote call: while the cluster is down it is a one-line
``ClusterError``, once the head answers again it reconnects (a new ``Mesh`` for the same key).
"""

from __future__ import annotations

import os
import socket
import threading
import weakref
from dataclasses import dataclass

import ray

from mesh_ray import Mesh, connect
from mesh_ray.cluster.access import probe_tcp, resolve_address
from mesh_ray.errors import ClusterError

_lock = threading.RLock()
# Ray's own default (60 s) would end the ComfyUI process when the cluster is down for a minute.
GCS_RECONNECT_VAR = "RAY_gcs_rpc_server_reconnect_timeout_s"
GCS_RECONNECT_S = 10 * 365 * 24 * 3600


@dataclass
class _Current:
    key: tuple[str, str]
    mesh: Mesh
    owns_ray: bool  # this module started or joined Ray (else Ray was already up in this process)
    timeout_s: float = 30.0


_current: _Current | None = None
_replaced: "weakref.WeakKeyDictionary[Mesh, tuple[str, str]]" = weakref.WeakKeyDictionary()  # stale -> key


def _join(key: tuple[str, str], timeout_s: float) -> Mesh:
    """``connect`` for ``key``; a cluster joined by address is joined so that its outages do not end this process."""
    address, namespace = key
    if not address or ray.is_initialized():
        return connect(address or None, namespace=namespace, timeout_s=timeout_s)
    before = os.environ.get(GCS_RECONNECT_VAR)
    os.environ.setdefault(GCS_RECONNECT_VAR, str(GCS_RECONNECT_S))  # read by Ray's core worker in ray.init
    try:
        return connect(address, namespace=namespace, timeout_s=timeout_s)
    finally:
        if before is None:
            os.environ.pop(GCS_RECONNECT_VAR, None)


def mesh_for(address: str = "", namespace: str = "", timeout_s: float = 30.0) -> Mesh:
    """The process's Mesh for ``address`` ("" embedded, "auto", "host:port"), reused across queues."""
    global _current
    address, namespace = address.strip(), namespace.strip() or "mesh-ray"
    key = (address, namespace)
    with _lock:
        if _current is not None and _current.key == key and ray.is_initialized():
            _current.timeout_s = timeout_s
            return live_mesh(_current.mesh)
        if address and address != "auto":
            probe_tcp(address, timeout_s)  # fail fast, before dropping a working connection
        if _current is not None and ray.is_initialized() and _current.owns_ray:
            if node_alive():
                _current.mesh.close()
            ray.shutdown()
        already_up = ray.is_initialized()
        mesh = _join(key, timeout_s)
        if _current is not None and _current.key == key:
            _replaced[_current.mesh] = key  # reconnected after the cluster went away
        _current = _Current(key, mesh, owns_ray=not already_up, timeout_s=timeout_s)
        return mesh


def node_alive() -> bool:
    """Whether this process's Ray node (its raylet's object store) still accepts connections.

    True without a local node to check (no Ray, Ray Client).  A unix-socket connect: microseconds."""
    node = getattr(ray._private.worker.global_worker, "node", None) if ray.is_initialized() else None
    path = getattr(node, "plasma_store_socket_name", None)
    if not path:
        return True
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def live_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` while its cluster is up; after the cluster went away and its head answers again,
    a new connection to it (the same for every stale handle of that key); a one-line
    ``ClusterError`` while it is still down.  A Mesh this module did not make is returned as is."""
    global _current
    with _lock:
        cur = _current
        if cur is None:
            return mesh
        if mesh is not cur.mesh:
            return cur.mesh if _replaced.get(mesh) == cur.key else mesh
        if ray.is_initialized() and node_alive():
            return mesh
        address = cur.key[0]
        if not address or not cur.owns_ray:
            raise ClusterError("this ComfyUI process's Ray node is gone (its raylet stopped): restart ComfyUI")
        try:
            probe_tcp(resolve_address(address), cur.timeout_s)
        except ClusterError:
            raise ClusterError(f"the Ray cluster at {address} went away (nothing answers there now): start it "
                               f"again at that address, then queue again: ComfyUI reconnects, no restart") from None
        if ray.is_initialized():
            ray.shutdown()  # the old session's driver: its node is gone, so nothing of it is closed remotely
        new = _join(cur.key, cur.timeout_s)
        _replaced[mesh] = cur.key
        _current = _Current(cur.key, new, owns_ray=True, timeout_s=cur.timeout_s)
        return new


def current() -> Mesh | None:
    """The connection made so far in this process, if any."""
    return _current.mesh if _current is not None else None
