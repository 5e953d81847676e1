"""cluster.yaml is a valid `ray up` config for the local provider (Ray's own schema and preparation)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_validates_against_ray_schema():
    raw = yaml.safe_load(CONFIG.read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert raw["provider"]["type"] == "local"
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("mesh-ray" in c for c in raw["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(raw[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert "--num-gpus" in " ".join(raw["worker_start_ray_commands"])
    # the ports README's "A real cluster" section gives drivers: HEAD:6379 and ray://HEAD:10001
    assert "--port=6379 --ray-client-server-port=10001" in " ".join(raw["head_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(raw["worker_start_ray_commands"])
