"""Fixtures for tests against the real ComfyUI, in two versions, each found through a variable:

- ``COMFYUI_PATH``: the ComfyUI the bridge is built against (0.20; CI: ``../shared/comfyui-0.20``).
  The whole bridge suite runs against it: ``comfyui_dir``, ``comfy``.
- ``COMFYUI_OLD_PATH``: the oldest ComfyUI kept working (0.3.64; CI: ``../shared/comfyui``), for a
  smoke subset: ``comfyui_old_dir``, ``comfy_old``.
- ``comfyui_each_dir`` / ``comfy_each``: the test runs once per version (ids ``new`` and ``old``).

Every test that runs against the old version is marked ``comfyui_old`` (added here from its
fixtures), so ``pytest -m comfyui_old tests/comfy`` runs the smoke subset.  A test whose variable
is unset is skipped with the reason; CI (``.ci/run``) sets both when ``../shared`` has the trees.

ComfyUI runs in a Ray actor (``comfy_host.ComfyHost``, started with ``--cpu`` and temporary
custom_nodes/models/output folders), so its global state never leaks into other tests; one host
actor lives at a time (a test of the other version replaces it).  A test hands a plain function to
``comfy(fn, *args)``; it runs inside that ComfyUI process and its result comes back.
``../shared/comfyui-stubs`` goes on ``sys.path`` only there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray

from comfy_host import CALL_TIMEOUT_S, REPO, stubs_of  # noqa: E402 - tests/comfy is on sys.path here

# which -> (variable, what it is, where CI finds it)
VERSIONS = {"new": ("COMFYUI_PATH", "ComfyUI 0.20, the version the bridge is built against", "../shared/comfyui-0.20"),
            "old": ("COMFYUI_OLD_PATH", "ComfyUI 0.3.64, the oldest kept working", "../shared/comfyui")}
OLD_MARK = "comfyui_old"
OLD_FIXTURES = ("comfyui_old_dir", "comfy_old")


def comfy_path(which: str = "new") -> Path | None:
    """The ComfyUI source tree of ``which`` ("new": ``COMFYUI_PATH``, "old": ``COMFYUI_OLD_PATH``;
    relative paths: from the repo root), or None when its variable is unset."""
    raw = os.environ.get(VERSIONS[which][0])
    if not raw:
        return None
    p = Path(raw)
    return p if p.is_absolute() else (REPO / p).resolve()


def comfy_tree(which: str) -> Path:
    """The tree of ``which`` for a test: skipped (with the reason) when its variable is unset."""
    var, what, ci = VERSIONS[which]
    p = comfy_path(which)
    if p is None:
        pytest.skip(f"{var} is not set: point it at a ComfyUI source tree ({what}; CI: {ci})")
    if not (p / "comfy" / "model_patcher.py").is_file():
        pytest.fail(f"{var}={p} is not a ComfyUI source tree (no comfy/model_patcher.py)")
    return p


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs against the old ComfyUI (its fixtures, or the ``old`` parameter)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if any(f in OLD_FIXTURES for f in getattr(item, "fixturenames", ())) or (
                callspec is not None and callspec.params.get("comfyui_each_dir") == "old"):
            item.add_marker(OLD_MARK)


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI of ``COMFYUI_PATH`` (0.20)."""
    return comfy_tree("new")


@pytest.fixture(scope="session")
def comfyui_old_dir() -> Path:
    """The ComfyUI of ``COMFYUI_OLD_PATH`` (0.3.64)."""
    return comfy_tree("old")


@pytest.fixture(scope="session", params=["new", "old"])
def comfyui_each_dir(request) -> Path:
    """Each ComfyUI in turn (test ids ``[new]`` and ``[old]``)."""
    return comfy_tree(request.param)


def _by_value(module) -> None:
    """Ship a test module's functions to the host by value (the host cannot import tests/)."""
    ray.cloudpickle.register_pickle_by_value(module)


class _Host:
    """One ComfyUI version's host actor: started on first use, and again when another test restarted Ray."""

    def __init__(self, comfyui_dir: Path, workdir: Path):
        self.comfyui_dir, self.workdir = comfyui_dir, workdir
        self.actor = None
        self.cluster = None

    def get(self):
        cluster = ray.get_runtime_context().gcs_address
        if self.actor is None or cluster != self.cluster:
            import comfy_host as host_module

            _by_value(host_module)
            self.actor = host_module.ComfyHostActor.remote(str(REPO), str(self.comfyui_dir), stubs_of(self.comfyui_dir),
                                                           str(self.workdir))
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


class _Hosts:
    """The hosts of the session by tree; one lives at a time (two ComfyUI processes would hold twice the memory)."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.hosts: dict[Path, _Host] = {}

    def get(self, tree: Path):
        for other, host in self.hosts.items():
            if other != tree:
                host.close()
        if tree not in self.hosts:
            self.hosts[tree] = _Host(tree, self.tmp_path_factory.mktemp(f"comfyui-{tree.name}"))
        return self.hosts[tree].get()

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()


@pytest.fixture(scope="session")
def comfy_hosts(tmp_path_factory):
    hosts = _Hosts(tmp_path_factory)
    yield hosts
    hosts.close()


def _caller(host, request):
    """``call(fn, *args, **kwargs)``: run ``fn`` inside the ComfyUI process ``host`` and return its result."""
    _by_value(sys.modules[request.module.__name__])

    def call(fn, *args, timeout: float = CALL_TIMEOUT_S, **kwargs):
        return ray.get(host.call.remote(fn, *args, **kwargs), timeout=timeout)

    return call


@pytest.fixture
def comfy(comfy_hosts, comfyui_dir, ray_local, request):
    """``comfy(fn, *args, **kwargs)``: run ``fn`` inside the ComfyUI 0.20 process (a Ray actor in the
    session's test cluster) and return its result."""
    return _caller(comfy_hosts.get(comfyui_dir), request)


@pytest.fixture
def comfy_old(comfy_hosts, comfyui_old_dir, ray_local, request):
    """As ``comfy``, inside the ComfyUI 0.3.64 process."""
    return _caller(comfy_hosts.get(comfyui_old_dir), request)


@pytest.fixture
def comfy_each(comfy_hosts, comfyui_each_dir, ray_local, request):
    """As ``comfy``, inside each version's ComfyUI process in turn."""
    return _caller(comfy_hosts.get(comfyui_each_dir), request)
