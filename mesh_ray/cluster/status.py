"""``mesh-ray status``: the cluster's nodes with their resources, the mesh actors on each, and where the driver is."""

from __future__ import annotations

from typing import Any

import ray
from rich.console import Console
from rich.table import Table

HIDDEN = ("node:", "bundle_group", "memory", "object_store_memory", "accelerator_type:")


def _actor_node(actor: dict) -> str | None:
    """The node id an actor runs on: what it reports itself, else Ray's actor table (GCS)."""
    node = actor.get("node_id") or actor.get("node")
    if node or not actor.get("actor_id"):
        return node
    try:
        from ray._private.state import actors as actor_table

        return actor_table(actor["actor_id"]).get("Address", {}).get("NodeID")
    except Exception:  # noqa: BLE001 - an actor that just died has no entry; status still renders
        return None


def driver_location(node_ids: set[str]) -> dict:
    """This process as seen by the cluster: a Ray Client outside it, or a driver on one of its nodes."""
    from ray.util.client import ray as client_ray

    ip = ray.util.get_node_ip_address()
    if client_ray.is_connected():
        return {"ip": ip, "node_id": None, "in_cluster": False, "via": "ray client"}
    node_id = ray.get_runtime_context().get_node_id()
    return {"ip": ip, "node_id": node_id, "in_cluster": node_id in node_ids, "via": "local raylet"}


def collect(mesh: Any) -> dict:
    """``Mesh.status()`` plus, per node, the mesh actors on it, and the driver's place relative to the nodes."""
    result = mesh.status()
    heads = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("node:__internal_head__")}
    by_node: dict[str | None, list[str]] = {}
    for a in result["actors"]:
        a["node_id"] = _actor_node(a)
        by_node.setdefault(a["node_id"], []).append(a["name"])
    for n in result["nodes"]:
        n["head"] = n["node_id"] in heads
        n["actors"] = by_node.get(n["node_id"], [])
    result["driver"] = driver_location({n["node_id"] for n in result["nodes"]})
    return result


def _resources(res: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if not k.startswith(HIDDEN))


def render(result: dict, console: Console | None = None) -> None:
    """Nodes (resources, actors), the mesh actors' details and where the driver runs, as tables."""
    c = console or Console()
    c.print(f"mode: {result['mode']}")
    d = result["driver"]
    if d["in_cluster"]:
        c.print(f"driver: on node {d['node_id'][:12]} ({d['ip']}), inside the cluster")
    else:
        c.print(f"driver: {d['ip']} via {d['via']}, on a machine outside the cluster's nodes "
                f"(data for it passes through the head)")
    nodes = Table(title="nodes")
    for col in ("node", "ip", "role", "resources", "mesh actors"):
        nodes.add_column(col)
    for n in result["nodes"]:
        nodes.add_row(n["node_id"][:12], n["ip"], "head" if n["head"] else "worker", _resources(n["resources"]),
                      "\n".join(n["actors"]) or "-")
    c.print(nodes)
    res = Table(title="resources")
    for col in ("resource", "total", "available"):
        res.add_column(col)
    for k, v in sorted(result["total"].items()):
        if not k.startswith(HIDDEN):
            res.add_row(k, f"{v:g}", f"{result['available'].get(k, 0):g}")
    c.print(res)
    if not result["actors"]:
        c.print("mesh actors: none")
        return
    act = Table(title="mesh actors")
    for col in ("name", "kind", "blocks", "node", "device", "weights MB", "rss MB"):
        act.add_column(col)
    for a in result["actors"]:
        act.add_row(a["name"], a.get("kind", "?"), a.get("blocks", ""), (a.get("node_id") or "?")[:12],
                    a.get("device", ""), f"{a.get('weight_bytes', 0) / 1e6:.1f}", f"{(a.get('rss_bytes') or 0) / 1e6:.0f}")
    c.print(act)
