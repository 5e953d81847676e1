"""Ray connection: the only place that starts or joins Ray."""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from mesh_ray.cluster.access import (TOKEN_FIX, client_refused, preflight, present_token_if_available, probe_tcp,
                                     resolve_address)
from mesh_ray.config import ConnectOptions
from mesh_ray.errors import ClusterError


CLIENT_INIT_FAILURE = "Initialization failure from server"  # Ray Client: the head's per-client server was late


def _init(retry_s: float = 0.0, **kwargs: Any) -> None:
    """ray.init with its failures turned into one-line ClusterErrors.

    Runs in the caller's thread (Ray's signal handlers need the main thread); a remote address
    has already passed a TCP probe, and Ray bounds its own GCS connection wait.  A Ray Client
    connection whose server on the head did not start its per-client server in time (a loaded
    head) is tried again for up to ``retry_s`` seconds.
    """
    where = kwargs.get("address") or "embedded"
    deadline = time.monotonic() + retry_s
    while True:
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises several unrelated types here
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not (where.startswith("ray://") and CLIENT_INIT_FAILURE in msg and time.monotonic() < deadline):
                raise _init_error(where, msg) from None
        ray.shutdown()
        time.sleep(1.0)


def _init_error(where: str, msg: str) -> ClusterError:
    """The one-line error for a failed ``ray.init`` at ``where`` that said ``msg``."""
    if where.startswith("ray://") and "connection timeout" in msg:
        return client_refused(where)
    if "No node info found" in msg:  # a driver by host:port needs a Ray node of that cluster on its machine
        return ClusterError(f"this machine runs no node of the Ray cluster at {where}: drivers outside the cluster "
                            f"connect with ray://HEAD:10001 (Ray Client), or join this machine with "
                            f"`ray start --address={where}`")
    if "auth" in msg.lower() or "token" in msg.lower():
        return ClusterError(f"Ray at {where} refused the connection ({msg}): {TOKEN_FIX}")
    return ClusterError(f"could not join Ray at {where} ({msg}): check that `ray status` works on the head and "
                        f"that this machine reaches every node's ports, or use address=None for an embedded "
                        f"local Ray")


def ensure_ray(options: ConnectOptions) -> str:
    """Join or start Ray as ``options`` says; returns "embedded" or the address joined."""
    if ray.is_initialized():
        return "existing"
    address = ray_address(options.address)
    common = dict(namespace=options.namespace, log_to_driver=False, configure_logging=False)
    if address:
        if address.startswith("ray://"):  # Ray Client: its server is not a GCS, so only reachability is checked
            probe_tcp(address, options.timeout_s)
            present_token_if_available()
        else:
            target = resolve_address(address)  # "auto": the cluster Ray itself would pick on this machine
            probe_tcp(target, options.timeout_s)
            preflight(target, options.timeout_s)
        _init(retry_s=options.timeout_s, address=address, **common)
        return address
    num_cpus = options.num_cpus or os.cpu_count() or 1
    # address="local": always a new embedded cluster, never a stranger's `ray start` on this machine.
    _init(address="local", num_cpus=num_cpus, num_gpus=options.num_gpus, include_dashboard=False, **common)
    return "embedded"


def ray_address(address: str | None = None, fallback: str | None = None) -> str | None:
    """The Ray address to use: the one given, else ``RAY_ADDRESS``, else ``fallback``."""
    return address or os.environ.get("RAY_ADDRESS") or fallback
