"""A driver process for tests/test_operator_cluster.py: it joins a `ray start` cluster in its own process.

Usage: ``python operator_driver.py connect ADDRESS`` | ``split ADDRESS CHECKPOINT`` | ``metadata ADDRESS [JSON]``.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def connect_cmd(address: str) -> dict:
    """Join by ``address`` and report the nodes seen (mesh_ray.connect, the path under test)."""
    import ray

    from mesh_ray.mesh import connect

    mesh = connect(address, timeout_s=30)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    return {"mode": mesh.mode, "nodes": len(nodes), "cpus": ray.cluster_resources().get("CPU", 0)}


def split_cmd(address: str, checkpoint: str) -> dict:
    """A 2-stage strict_spread split vs the local model: one generated image each, plus `mesh-ray status` meanwhile."""
    from mesh_ray.models.images import latent_to_rgb
    from mesh_ray.mesh import connect
    from mesh_ray.models.checkpoint import inspect, load_blocks
    from mesh_ray.models.flux import build
    from mesh_ray.split.sampler import generate, random_conditioning

    info = inspect(checkpoint)
    local = build(info.config, "meta")
    local.load_state_dict(load_blocks(checkpoint, ["all"], non_block=True, info=info), assign=True, strict=True)
    txt, y = random_conditioning(info.config, batch=1, txt_len=8, seed=3)
    kw = dict(width=32, height=32, steps=2, seed=3, progress=False)
    mesh = connect(address, timeout_s=30)
    split = mesh.split(checkpoint, stages=2, placement="strict_spread", codec="raw", start_timeout_s=120)
    try:
        latent_split = generate(split, txt, y, **kw)
        stage_nodes = [i["node_id"] for i in split.stage_info()]
        modes = [t.mode for t in split.last.transfers]
        status = subprocess.run([sys.executable, "-m", "mesh_ray.cli", "status", "--address", address, "--json"],
                                capture_output=True, text=True, timeout=120)
        table = subprocess.run([sys.executable, "-m", "mesh_ray.cli", "status", "--address", address],
                               capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    finally:
        split.close()
    with torch.inference_mode():
        latent_local = generate(local, txt, y, **kw)
    return {"latent_equal": torch.equal(latent_split, latent_local),
            "image_equal": latent_to_rgb(latent_split[0]).tobytes() == latent_to_rgb(latent_local[0]).tobytes(),
            "stage_nodes": stage_nodes, "modes": modes, "split_id": split.id,
            "status_rc": status.returncode, "status": json.loads(status.stdout.strip().splitlines()[-1]),
            "status_stderr": status.stderr[-2000:], "table_rc": table.returncode, "table": table.stdout}


def metadata_cmd(address: str, new: str | None = None) -> dict:
    """Read (and with ``new``, replace) the version metadata the head publishes in its GCS."""
    from ray._common.usage import usage_constants  # noqa: I001 - Ray's own KV key and namespace
    from ray._common.usage.usage_lib import get_cluster_metadata
    from ray._private import ray_constants
    from ray._raylet import GcsClient

    from mesh_ray.cluster.access import present_token_if_available

    present_token_if_available()
    client = GcsClient(address=address)
    old = get_cluster_metadata(client)
    if new is not None:
        client.internal_kv_put(usage_constants.CLUSTER_METADATA_KEY, new.encode(), True,
                               ray_constants.KV_NAMESPACE_CLUSTER)
    return {"metadata": old}


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    out = {"connect": connect_cmd, "split": split_cmd, "metadata": metadata_cmd}[cmd](*args)
    print(json.dumps(out, default=str))
