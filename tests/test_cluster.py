"""Connection errors and multi-node placement with ray.cluster_utils.Cluster (real Ray, several nodes)."""

import socket
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
