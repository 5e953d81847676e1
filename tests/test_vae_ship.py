"""VAE decoder weights shipped once to a replica that does not read the file, cached by content hash."""

from __future__ import annotations

import pytest
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.models.vae import load_vae, write_random_vae
from mesh_ray.vae.service import VaeService

ACTOR_OPTS = dict(num_cpus=0.5, torch_threads=1)


def test_weights_shipped_once_then_loaded_from_the_node_cache(ray_local, tmp_path):
    vae_file = write_random_vae(tmp_path / "vae.safetensors", "tiny-flux1", seed=5)
    cache = tmp_path / "cache"
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = load_vae(vae_file).decode(latent)
    sources = []
    for _ in range(2):
        svc = VaeService(vae_file, replicas=1, ship="always", cache_dir=str(cache), **ACTOR_OPTS)
        try:
            assert torch.allclose(svc.decode(latent, timeout=120), expected, atol=1e-5)
            sources.append(svc.replica_info()[0]["weights_source"])
        finally:
            svc.close()
    assert sources == ["object_store", "cache"]
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_bad_ship_value_is_one_line(ray_local, tmp_path):
    vae_file = write_random_vae(tmp_path / "vae.safetensors", "tiny-flux1", seed=5)
    with pytest.raises(ConfigError, match="invalid VaeOptions option 'ship': Input should be 'auto', 'always' or 'never'"):
        VaeService(vae_file, ship="sometimes")
