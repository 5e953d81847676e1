"""Security: nothing from users is unpickled; graphs are JSON and settings plain YAML; Ray token auth
holds across the nodes of a real multi-node cluster (a driver without the token is refused)."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from mesh_ray.config import SplitOptions, load_settings
from mesh_ray.errors import ConfigError
from mesh_ray.workflow.graph import load_graph

ROOT = Path(__file__).resolve().parents[1]
UNSAFE = re.compile(r"pickle\.loads?\(|cloudpickle\.loads?\(|torch\.load\(|yaml\.load\(|yaml\.unsafe_load|"
                    r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|marshal\.loads?\(|shelve\.open\(")


def test_no_source_file_unpickles_anything():
    """Checkpoints, LoRAs and shards go through safetensors, graphs through json, settings through
    yaml.safe_load; only Ray's own transport deserialises objects (between our processes)."""
    files = [p for d in ("mesh_ray", "comfy_integration") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
            for n, line in enumerate(p.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert not hits, hits


def test_a_pickled_graph_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "graph.json"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil.write_bytes(pickle.dumps({"a": Boom()}))
    with pytest.raises(ConfigError, match="not JSON text") as e:
        load_graph(evil)
    assert "\n" not in str(e.value) and not marker.exists()


def test_settings_yaml_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "split.yaml"
    f.write_text(f'micro_batches: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_settings(SplitOptions, f)
    assert "\n" not in str(e.value) and not marker.exists()


TOKEN_CLUSTER = textwrap.dedent("""
    import os, subprocess, sys, json
    from ray.cluster_utils import Cluster
    driver = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = {}
        for name, token in (("same", os.environ["RAY_AUTH_TOKEN"]), ("other", "0" * 32)):
            env = dict(os.environ, RAY_AUTH_TOKEN=token)
            p = subprocess.run([sys.executable, driver, cluster.address], env=env, capture_output=True, text=True,
                               timeout=180)
            out[name] = {"rc": p.returncode, "last": (p.stdout.strip().splitlines() or [""])[-1]}
        print(json.dumps(out))
    finally:
        cluster.shutdown()
""")

TOKEN_DRIVER = textwrap.dedent("""
    import sys, ray
    from mesh_ray.errors import ClusterError
    from mesh_ray.mesh import connect
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    try:
        connect(sys.argv[1], timeout_s=20)
    except ClusterError as e:
        print("ClusterError:", e)
        sys.exit(3)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    where = ray.remote(num_cpus=0)(lambda: ray.get_runtime_context().get_node_id())
    seen = {ray.get(where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(), timeout=60)
            for n in nodes}
    print("nodes", len(nodes), len(seen))
""")


def test_token_auth_across_two_nodes(tmp_path):
    """Both nodes share the cluster's token; a driver with it runs work on each, one without is refused."""
    assert os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN")  # set by conftest
    (tmp_path / "cluster.py").write_text(TOKEN_CLUSTER)
    (tmp_path / "driver.py").write_text(TOKEN_DRIVER)
    env = dict(os.environ, RAY_AUTH_TOKEN=uuid.uuid4().hex, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, str(tmp_path / "cluster.py"), str(tmp_path / "driver.py")], env=env,
                       capture_output=True, text=True, timeout=480)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["same"] == {"rc": 0, "last": "nodes 2 2"}, out
    assert out["other"]["rc"] == 3 and "auth token" in out["other"]["last"], out
