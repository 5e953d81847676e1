"""Shared fixtures: one real local Ray for the session, independent of ~/.ray.

Plain helper functions are in ``tests/helpers.py``: test modules import them from there, never
from ``conftest`` (tests/comfy has a conftest of its own, and the two would shadow each other).
"""

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

from helpers import ensure_ray  # noqa: E402,F401 - plain helpers live in tests/helpers.py (a unique module name)
from mesh_ray.mesh import connect  # noqa: E402
from mesh_ray.models import write_random_checkpoint  # noqa: E402


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


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def tiny_ckpts(ckpt_dir):
    """Seeded random tiny FLUX.1 and FLUX.2 checkpoints as real safetensors files."""
    return {arch: write_random_checkpoint(ckpt_dir / f"tiny-{arch}.safetensors", f"tiny-{arch}", seed=7)
            for arch in ("flux1", "flux2")}
