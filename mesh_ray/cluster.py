"""Ray connection, resource checks and placement: the only place that starts or joins Ray."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

from mesh_ray.config import ConnectOptions
from mesh_ray.errors import ClusterError


def _probe_tcp(address: str, timeout_s: float) -> None:
    """Fail fast when host:port does not accept connections (ray.init would retry for minutes)."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port: use e.g. 127.0.0.1:6379, ray://host:10001 or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout_s, 5.0)):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}): start one with "
                           f"`ray start --head`, check the address and firewall, or use address=None for "
                           f"an embedded local Ray") from None


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
        answered = where not in ("embedded", "local", "auto") and "failed to connect" in msg.lower()
        if "auth" in msg.lower() or "token" in msg.lower() or answered:
            # The address passed the TCP probe, so a refusal there is nearly always a token mismatch.
            raise ClusterError(f"Ray at {where} refused the connection ({msg}): copy the cluster's auth token "
                               f"(~/.ray/auth_token on the head) to this machine or set RAY_AUTH_TOKEN (and check that both "
                               f"run the same Ray version)") from None
        raise ClusterError(f"could not connect to Ray at {where} ({msg}): start it with `ray start --head` "
                           f"or use address=None for an embedded local Ray") from None


def ensure_ray(options: ConnectOptions) -> str:
    """Join or start Ray as ``options`` says; returns "embedded" or the address joined."""
    if ray.is_initialized():
        return "existing"
    address = options.address or os.environ.get("RAY_ADDRESS")
    common = dict(namespace=options.namespace, log_to_driver=False, configure_logging=False)
    if address:
        if address != "auto":
            _probe_tcp(address, options.timeout_s)
        _init(address=address, **common)
        return address
    num_cpus = options.num_cpus or os.cpu_count() or 1
    # address="local": always a new embedded cluster, never a stranger's `ray start` on this machine.
    _init(address="local", num_cpus=num_cpus, num_gpus=options.num_gpus, include_dashboard=False, **common)
    return "embedded"


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


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
