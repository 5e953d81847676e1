"""What the cluster has and where actors go: GPU counts, free resources, node pinning."""

from __future__ import annotations

from typing import Any

import ray

from mesh_ray.errors import ClusterError


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def default_num_gpus() -> float:
    """GPUs an actor asks for when not told: one when the cluster has GPUs, else none (CPU)."""
    return 1.0 if cluster_gpus() >= 1 else 0.0


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
