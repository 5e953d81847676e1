"""Shared fixtures: one real local Ray for the session, independent of ~/.ray."""

from __future__ import annotations

import os
import uuid

# Token auth as Ray 2.60 does by default, but with a token from the environment so that no test
# reads or writes ~/.ray/auth_token.  Set before ray is imported anywhere.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402
import ray  # noqa: E402

import torch  # noqa: E402

from mesh_ray.mesh import connect  # noqa: E402
from mesh_ray.models import write_random_checkpoint  # noqa: E402
from mesh_ray.models.checkpoint import inspect, load_blocks  # noqa: E402
from mesh_ray.models.flux import build, position_ids  # noqa: E402

RAY_CPUS = 8  # logical CPUs: more than the 2 real cores, so several stage actors fit


def ensure_ray() -> None:
    """Start the test cluster if no test has (tests that need their own cluster shut it down)."""
    if not ray.is_initialized():
        # address="local": always a cluster of our own, never one a `ray start` left on this machine
        ray.init(address="local", num_cpus=RAY_CPUS, num_gpus=0, include_dashboard=False, namespace="mesh-ray-tests",
                 log_to_driver=False, configure_logging=False)


@pytest.fixture
def ray_local():
    """A real local Ray cluster, shared by the tests of the session."""
    ensure_ray()
    yield ray


@pytest.fixture
def mesh(ray_local):
    """A ``Mesh`` on the test cluster; every split and VAE service made through it is closed after the test."""
    m = connect()
    yield m
    m.close()


def inputs(cfg, b=2, h=4, w=6, txt_len=5, seed=0):
    """Seeded forward inputs (img, img_ids, txt, txt_ids, timesteps, y, guidance) for a FLUX config."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, h * w, cfg.in_channels, generator=g)
    txt = torch.randn(b, txt_len, cfg.context_in_dim, generator=g)
    img_ids, txt_ids = position_ids(cfg.arch, b, h, w, txt_len)
    t = torch.rand(b, generator=g)
    y = torch.randn(b, cfg.vec_in_dim, generator=g) if cfg.vec_in_dim else None
    guidance = torch.full((b,), 3.5) if cfg.guidance_embed else None
    return img, img_ids, txt, txt_ids, t, y, guidance


def local_model(path):
    """The whole model of a checkpoint in this process (the reference a split is compared with)."""
    info = inspect(path)
    model = build(info.config, "meta")
    model.load_state_dict(load_blocks(path, ["all"], non_block=True, info=info), assign=True, strict=True)
    return model


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def tiny_ckpts(ckpt_dir):
    """Seeded random tiny FLUX.1 and FLUX.2 checkpoints as real safetensors files."""
    return {arch: write_random_checkpoint(ckpt_dir / f"tiny-{arch}.safetensors", f"tiny-{arch}", seed=7)
            for arch in ("flux1", "flux2")}
