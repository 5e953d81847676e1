"""Ray connection, resource checks and placement: the only place that starts or joins Ray."""

from __future__ import annotations

import os
from typing import Any

import ray

from mesh_ray.cluster_access import (TOKEN_FIX, client_refused, preflight, present_token_if_available, probe_tcp,
                                     resolve_address)
from mesh_ray.config import ConnectOptions
from mesh_ray.errors import ClusterError


def _init(**kwargs: Any) -> None:
    """ray.init with its failures turned into one-line ClusterErrors.

    Runs in the caller's thread (Ray's signal handlers need the main thread); a remote address
    has already passed a TCP probe, and Ray bounds its own GCS connection wait.
    """
    where = kwargs.get("address") or "embedded"
    try:
        ray.init(**kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises several unrelated types here
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if where.startswith("ray://") and "connection timeout" in msg:
            raise client_refused(where) from None
        if "No node info found" in msg:  # a driver by host:port needs a Ray node of that cluster on its machine
            raise ClusterError(f"this machine runs no node of the Ray cluster at {where}: drivers outside the cluster "
                               f"connect with ray://HEAD:10001 (Ray Client), or join this machine with "
                               f"`ray start --address={where}`") from None
        if "auth" in msg.lower() or "token" in msg.lower():
            raise ClusterError(f"Ray at {where} refused the connection ({msg}): {TOKEN_FIX}") from None
        raise ClusterError(f"could not join Ray at {where} ({msg}): check that `ray status` works on the head and "
                           f"that this machine reaches every node's ports, or use address=None for an embedded "
                           f"local Ray") from None


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
        _init(address=address, **common)
        return address
    num_cpus = options.num_cpus or os.cpu_count() or 1
    # address="local": always a new embedded cluster, never a stranger's `ray start` on this machine.
    _init(address="local", num_cpus=num_cpus, num_gpus=options.num_gpus, include_dashboard=False, **common)
    return "embedded"


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def default_num_gpus() -> float:
    """GPUs an actor asks for when not told: one when the cluster has GPUs, else none (CPU)."""
    return 1.0 if cluster_gpus() >= 1 else 0.0


def ray_address(address: str | None = None, fallback: str | None = None) -> str | None:
    """The Ray address to use: the one given, else ``RAY_ADDRESS``, else ``fallback``."""
    return address or os.environ.get("RAY_ADDRESS") or fallback


def describe_resources() -> dict[str, Any]:
    """Totals and what is free now, per resource, plus the alive nodes."""
    nodes = [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
              "resources": {k: v for k, v in n["Resources"].items() if not k.startswith(("node:", "bundle_group"))}}
             for n in ray.nodes() if n["Alive"]]
    return {"total": ray.cluster_resources(), "available": ray.available_resources(), "nodes": nodes}


def explain_unschedulable(need: dict[str, float], what: str) -> str:
    """A one-line reason why ``need`` may not be schedulable right now."""
    avail = ray.available_resources()
    total = ray.cluster_resources()
    short = [f"{k}={v:g} (cluster has {total.get(k, 0):g}, free {avail.get(k, 0):g})"
             for k, v in need.items() if v and avail.get(k, 0) < v]
    if short:
        return f"{what} needs {', '.join(short)}: lower num_gpus/num_cpus or add a node with `ray start --address=...`"
    return f"{what} did not start in time: check `ray status` and the worker logs, or raise start_timeout_s"


def node_affinity(node: str) -> Any:
    """A scheduling strategy pinning an actor to a node given by IP or node id."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for n in ray.nodes():
        if n["Alive"] and node in (n["NodeID"], n["NodeManagerAddress"]):
            return NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
    ips = ", ".join(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    raise ClusterError(f"no alive node {node!r} in the cluster (nodes: {ips}): use one of these IPs or node ids")
