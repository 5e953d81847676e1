"""Measure the cluster's candidate devices for the planner: a probe actor on each, one after the other."""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from mesh_ray.actors.probe import ProbeActor
from mesh_ray.cluster.resources import node_affinity
from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.models.flux import FluxConfig
from mesh_ray.split.plan import DeviceProfile


def candidates(stages: int | None = None, threads: list[int] | None = None) -> list[dict]:
    """StageSpec fields of each candidate device: one per GPU in the cluster, else ``stages`` CPU stages."""
    gpus = []
    for node in ray.nodes():
        if node["Alive"]:
            # Pinned by node id: several nodes may share an IP (containers, test clusters).
            gpus += [{"num_gpus": 1.0, "node": node["NodeID"]}] * int(node["Resources"].get("GPU", 0))
    if gpus and not threads:
        if stages is not None and stages > len(gpus):
            raise ConfigError(f"{stages} stages asked for but the cluster has {len(gpus)} GPUs: use at most {len(gpus)}")
        return gpus[: stages or len(gpus)]
    threads = threads or [1] * (stages or 2)
    if stages is not None and len(threads) != stages:
        raise ConfigError(f"{len(threads)} thread counts for {stages} stages: give one per stage")
    return [{"num_gpus": 0.0, "torch_threads": t} for t in threads]


def profile_devices(cfg: FluxConfig, fields: list[dict], img_tokens: int, txt_tokens: int, dtype: str = "auto",
                    repeats: int = 3, timeout_s: float = 600) -> tuple[list[DeviceProfile], float]:
    """Profile every candidate one after the other (each alone on the machine); also the link ms of one hop."""
    actors = []
    try:
        for f in fields:
            opts: dict[str, Any] = {"num_cpus": f.get("num_cpus", 1), "num_gpus": f.get("num_gpus", 0)}
            if f.get("node"):
                opts["scheduling_strategy"] = node_affinity(f["node"])
            actors.append(ProbeActor.options(**opts).remote(f.get("torch_threads")))
        profiles, link_ms = [], 0.0
        for i, (f, a) in enumerate(zip(fields, actors)):
            try:
                m = ray.get(a.measure.remote(cfg, img_tokens, txt_tokens, dtype, repeats), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise ClusterError(f"candidate {i} ({f}) did not finish its measurement within {timeout_s:.0f}s: "
                                   f"check `mesh-ray status` for free resources") from None
            where = f" @ {m['node_ip']}" if f.get("node") else ""
            profiles.append(DeviceProfile(name=f"{i}: {m['device']}{where}", double_ms=m["double_ms"],
                                          single_ms=m["single_ms"], free_bytes=m["free_bytes"], work_bytes=m["work_bytes"],
                                          h2d_bytes_per_s=m["h2d_bytes_per_s"], stage=dict(f), embed_ms=m["embed_ms"],
                                          final_ms=m["final_ms"]))
            if i == 0:
                act = torch.zeros(m["activation_bytes"] // 4, dtype=torch.float32)
                ray.get(a.echo.remote(act), timeout=timeout_s)
                t0 = time.perf_counter()
                ray.get(a.echo.remote(act), timeout=timeout_s)
                link_ms = (time.perf_counter() - t0) * 1000 / 2
        return profiles, link_ms
    finally:
        for a in actors:
            ray.kill(a)


def share_host_memory(profiles: list[DeviceProfile]) -> list[DeviceProfile]:
    """CPU candidates on one node share its host memory: give each an equal part."""
    by_node: dict[str, list[int]] = {}
    for i, p in enumerate(profiles):
        if p.h2d_bytes_per_s is None:
            by_node.setdefault(str(p.stage.get("node")), []).append(i)
    out = list(profiles)
    for idx in by_node.values():
        for i in idx:
            if out[i].free_bytes is not None:
                out[i] = out[i].model_copy(update={"free_bytes": out[i].free_bytes // len(idx)})
    return out


__all__ = ["candidates", "profile_devices", "share_host_memory"]
