"""Fixtures for tests against the real ComfyUI: found through ``COMFYUI_PATH``, skipped without it.

ComfyUI runs in a Ray actor (``comfy_host.ComfyHost``, started with ``--cpu`` and temporary
custom_nodes/models/output folders), so its global state never leaks into other tests.  A test
hands a plain function to ``comfy(fn, *args)``; it runs inside that ComfyUI process and its
result comes back.  ``../shared/comfyui-stubs`` goes on ``sys.path`` only there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray

from comfy_host import CALL_TIMEOUT_S, REPO  # noqa: E402 - tests/comfy is on sys.path here


def comfy_path() -> Path | None:
    """The ComfyUI source tree named by ``COMFYUI_PATH`` (relative paths: from the repo root)."""
    raw = os.environ.get("COMFYUI_PATH")
    if not raw:
        return None
    p = Path(raw)
    return p if p.is_absolute() else (REPO / p).resolve()


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    p = comfy_path()
    if p is None:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI source tree (CI: ../shared/comfyui)")
    if not (p / "comfy" / "model_patcher.py").is_file():
        pytest.fail(f"COMFYUI_PATH={p} is not a ComfyUI source tree (no comfy/model_patcher.py)")
    return p


def _by_value(module) -> None:
    """Ship a test module's functions to the host by value (the host cannot import tests/)."""
    ray.cloudpickle.register_pickle_by_value(module)


class _Host:
    """Starts the ComfyUI actor on first use, and again when another test restarted Ray."""

    def __init__(self, comfyui_dir: Path, workdir: Path):
        self.comfyui_dir, self.workdir = comfyui_dir, workdir
        self.actor = None
        self.cluster = None

    def get(self):
        cluster = ray.get_runtime_context().gcs_address
        if self.actor is None or cluster != self.cluster:
            import comfy_host as host_module

            _by_value(host_module)
            stubs = self.comfyui_dir.parent / "comfyui-stubs"
            self.actor = host_module.ComfyHostActor.remote(str(REPO), str(self.comfyui_dir),
                                                           str(stubs) if stubs.is_dir() else None, str(self.workdir))
            self.cluster = cluster
            ray.get(self.actor.dirs.remote(), timeout=CALL_TIMEOUT_S)
        return self.actor

    def close(self) -> None:
        """Kill the host if it still belongs to the running Ray (a test may have restarted Ray since)."""
        if self.actor is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address == self.cluster:
            try:
                ray.kill(self.actor)
            except ray.exceptions.ActorHandleNotFoundError:  # its session ended: the actor went with it
                pass
        self.actor = None


@pytest.fixture(scope="session")
def comfy_session(comfyui_dir, tmp_path_factory):
    host = _Host(comfyui_dir, tmp_path_factory.mktemp("comfyui"))
    yield host
    host.close()


@pytest.fixture
def comfy_host(comfy_session, ray_local):
    """The ComfyUI process (a Ray actor in the session's test cluster)."""
    return comfy_session.get()


@pytest.fixture
def comfy(comfy_host, request):
    """``comfy(fn, *args, **kwargs)``: run ``fn`` inside the ComfyUI process and return its result."""
    _by_value(sys.modules[request.module.__name__])

    def call(fn, *args, timeout: float = CALL_TIMEOUT_S, **kwargs):
        return ray.get(comfy_host.call.remote(fn, *args, **kwargs), timeout=timeout)

    return call
