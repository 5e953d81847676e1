"""Connection errors and multi-node placement with ray.cluster_utils.Cluster (real Ray, several nodes)."""

import os
import socket
import subprocess
import sys
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from mesh_ray.errors import ClusterError
from mesh_ray.mesh import connect

from helpers import inputs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_fast():
    was_up = ray.is_initialized()
    ray.shutdown()
    t0 = time.time()
    with pytest.raises(ClusterError, match=r"cannot reach a Ray cluster at 127.0.0.1:\d+ .*start one with `ray start --head`"):
        connect(f"127.0.0.1:{free_port()}", timeout_s=5)
    assert time.time() - t0 < 10
    with pytest.raises(ClusterError, match="is not host:port"):
        connect("nonsense", timeout_s=5)
    assert not ray.is_initialized() or was_up is None


def test_spread_stages_land_on_different_nodes(tiny_ckpts):
    ray.shutdown()  # this test needs its own multi-node cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        mesh = connect(cluster.address)
        split = mesh.split(str(tiny_ckpts["flux1"]), stages=2, placement="strict_spread")
        info = split.stage_info()
        assert len({i["node_id"] for i in info}) == 2
        assert all(i["gpu_ids"] for i in info)  # one (logical) GPU each; CPU compute here
        split(*inputs(split.config))
        # codec "auto": every link crosses nodes here and no NVENC exists, so quant8 on each hop
        assert [t.mode for t in split.last.transfers] == ["quant8"] * 3
        split.close()
        with pytest.raises(ClusterError, match="cannot be placed with placement=strict_spread"):
            mesh.split(str(tiny_ckpts["flux1"]), stages=4, placement="strict_spread", start_timeout_s=5)
    finally:
        ray.shutdown()
        cluster.shutdown()


NO_TOKEN_CLUSTER = """
import os, tempfile
from pathlib import Path
from ray.cluster_utils import Cluster
import ray
from mesh_ray.mesh import connect
from mesh_ray.models import write_random_checkpoint
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
try:
    mesh = connect(cluster.address)
    ckpt = write_random_checkpoint(Path(tempfile.mkdtemp()) / "t.safetensors", "tiny-flux1", seed=1)
    with mesh.split(str(ckpt), stages=2, codec="raw", start_timeout_s=60) as split:
        print("mode", os.environ.get("RAY_AUTH_MODE"), "stages", len(split.stage_info()))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_a_cluster_without_token_auth_is_joined_without_presenting_the_token(tmp_path):
    # This machine has a token (RAY_AUTH_TOKEN) but the cluster was started without token auth:
    # the driver must not switch itself to token mode, or its actors never start there.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(RAY_AUTH_TOKEN="f" * 32, HOME=str(tmp_path), MESH_RAY_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", NO_TOKEN_CLUSTER], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mode None stages 2" in out.stdout
