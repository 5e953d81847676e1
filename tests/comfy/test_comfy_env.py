"""comfy_integration/comfy_env.py: the ComfyUI a Ray worker imports is the ComfyUI process's own.

Every worker here is fresh (a task with ``max_calls=1`` and a runtime_env of its own, so no pooled
worker that imported ComfyUI before): it calls ``ComfySource.activate()`` and imports ComfyUI's
model code.  Sources come from a real ComfyUI host (each version), or from a process that imported
``comfy`` from a copy of the 0.20 tree which is deleted before any worker activates, so that
nothing but the object store and the node's cache can give the worker that tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

import comfy_host as h

TIMEOUT_S = 300


def _activate(src, cpu: bool | None = True) -> dict:
    """In a fresh worker: activate ``src``, import ComfyUI's model code, say where it came from."""
    import os
    import sys

    from comfy_integration.comfy_env import ComfyVersionError

    try:
        where = src.activate(cpu=cpu)
    except ComfyVersionError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    import comfy
    import comfy.ldm.flux.model  # noqa: F401 - a stage's block code
    import comfy.model_management as mm
    import comfy.model_patcher  # noqa: F401
    import comfyui_version
    from comfy.cli_args import args

    return {"where": where, "comfy": os.path.realpath(list(comfy.__path__)[0]), "version": comfyui_version.__version__,
            "device": str(mm.get_torch_device()), "pid": os.getpid(), "argv0": sys.argv[0],
            "args": {k: getattr(args, k) for k, v in src.args.items() if isinstance(v, bool)}}


def _fresh(fn, env: dict):
    """``fn`` as a task on a fresh worker with ``env`` (its runtime_env keeps pooled workers out)."""
    return ray.remote(num_cpus=1, max_calls=1, runtime_env={"env_vars": env})(fn)


# -- 1. inside a real ComfyUI process ------------------------------------------------------------

def _here_and_a_fresh_worker(cache: str) -> dict:
    import os

    import ray

    from comfy_integration.comfy_env import ComfySource

    src = ComfySource.here()  # ship="auto": one node, nothing shipped
    actors_get = src.for_actors()
    got = ray.get(_fresh(_activate, {"MESH_RAY_CACHE_DIR": cache}).remote(actors_get), timeout=TIMEOUT_S)
    return {"root": src.root, "version": src.version, "digest": src.digest, "shipped": actors_get.package,
            "extra_inside": [p for p in src.extra_paths if (p + os.sep).startswith(src.root + os.sep)],
            "stubs_extra": any(p.endswith("comfyui-stubs") for p in src.extra_paths), "host_pid": os.getpid(),
            "args": {k: v for k, v in src.args.items() if isinstance(v, bool)}, "worker": got}


def test_a_fresh_worker_imports_the_comfyui_process_s_own_tree(comfy_each, comfyui_each_dir, tmp_path):
    from comfy_integration.comfy_env import tree_digest, tree_version

    got = comfy_each(_here_and_a_fresh_worker, str(tmp_path / "shards"))
    tree = str(comfyui_each_dir.resolve())
    assert got["root"] == tree and got["version"] == tree_version(tree) and got["digest"] == tree_digest(tree)
    assert got["shipped"] == () and got["extra_inside"] == []  # one node: nothing shipped; no path into the tree
    assert got["stubs_extra"]  # the host's import paths outside site-packages go with it
    w = got["worker"]
    assert w["pid"] != got["host_pid"] and w["argv0"] != "main.py"
    assert w["where"] == tree and w["comfy"] == str(Path(tree) / "comfy") and w["version"] == got["version"]
    assert w["device"] == "cpu" and w["args"] == got["args"]  # the ComfyUI process's numeric arguments
    assert not (tmp_path / "comfyui").exists()  # no copy unpacked


# -- 2. a copy shipped through the object store -------------------------------------------------

class _ComfyOfACopy:
    """A process that imported ``comfy`` from a copy of a ComfyUI tree, as a ComfyUI process would."""

    def __init__(self, copy: str, pycache: str, stubs: str | None):
        import sys

        sys.pycache_prefix = pycache  # keep the copy as it is
        sys.path[:0] = [copy, *([stubs] if stubs else [])]  # the stand-ins too, as in the ComfyUI host
        import comfy.cli_args  # noqa: F401

    def source(self, ship: str, numeric: dict):
        from comfy.cli_args import args

        from comfy_integration.comfy_env import ComfySource

        for k, v in numeric.items():
            setattr(args, k, v)
        return ComfySource.here(ship=ship).for_actors()


def _copy_tree(tree: Path, to: Path) -> Path:
    """The parts of a ComfyUI tree a worker needs (``comfy/`` and the shipped top-level files)."""
    from comfy_integration.comfy_env import SHIPPED_FILES

    shutil.copytree(tree / "comfy", to / "comfy", ignore=shutil.ignore_patterns("__pycache__"))
    for f in SHIPPED_FILES:
        shutil.copy2(tree / f, to / f)
    return to


def _copy_process(comfyui_dir: Path, tmp_path: Path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    copy = _copy_tree(comfyui_dir, tmp_path / "copy-of-comfyui")
    owner = ray.remote(num_cpus=0)(_ComfyOfACopy).remote(str(copy), str(tmp_path / "pycache"), h.stubs_of(comfyui_dir))
    return copy, owner


def test_a_shipped_copy_is_imported_from_the_node_cache(comfyui_dir, ray_local, tmp_path):
    from comfy_integration.comfy_env import tree_digest, tree_version

    copy, owner = _copy_process(comfyui_dir, tmp_path)
    try:
        numeric = {"force_fp32": True, "use_pytorch_cross_attention": True}
        src = ray.get(owner.source.remote("always", numeric), timeout=TIMEOUT_S)
        assert src.root == str(copy.resolve()) and len(src.package) == 1
        assert src.digest == tree_digest(str(comfyui_dir))  # the same content as the tree it was copied from
        shutil.rmtree(copy)  # from now on only the object store has it

        env = {"MESH_RAY_CACHE_DIR": str(tmp_path / "node" / "shards")}
        cached = tmp_path / "node" / "comfyui" / src.digest
        first = ray.get(_fresh(_activate, env).remote(src), timeout=TIMEOUT_S)
        assert first.get("where") == str(cached), first
        assert first["comfy"] == str(cached / "comfy") and first["version"] == tree_version(comfyui_dir)
        assert first["args"]["force_fp32"] and first["args"]["use_pytorch_cross_attention"], first["args"]
        unpacked = os.stat(cached).st_ino

        ray.kill(owner)  # the object's owner is gone: only the node's cache can serve the next worker
        owner = None
        second = ray.get(_fresh(_activate, env).remote(src), timeout=TIMEOUT_S)
        assert second["where"] == str(cached) and second["pid"] != first["pid"]
        assert os.stat(cached).st_ino == unpacked  # not unpacked again
    finally:
        if owner is not None:
            ray.kill(owner)


# -- 3. a worker with another ComfyUI -------------------------------------------------------------

def test_a_worker_with_only_the_other_version_is_a_one_line_error(comfyui_dir, comfyui_old_dir, ray_local, tmp_path):
    from comfy_integration.comfy_env import WORKER_PATH_ENV, tree_version

    copy, owner = _copy_process(comfyui_dir, tmp_path)
    try:
        src = ray.get(owner.source.remote("never", {}), timeout=TIMEOUT_S)
        shutil.rmtree(copy)  # the ComfyUI process's folder is not on the worker's node
        cache = str(tmp_path / "node" / "shards")

        other = ray.get(_fresh(_activate, {"MESH_RAY_CACHE_DIR": cache, WORKER_PATH_ENV: str(comfyui_old_dir)})
                        .remote(src), timeout=TIMEOUT_S)
        msg = other.get("error")
        assert msg and msg.startswith("ComfyVersionError: this worker cannot import the ComfyUI process's "
                                      f"ComfyUI {tree_version(comfyui_dir)} ({src.digest[:8]})"), other
        assert "\n" not in msg and f"{WORKER_PATH_ENV} {tree_version(comfyui_old_dir)}" in msg, msg
        assert "MESH_RAY_COMFY_SHIP=always" in msg and "--ship always" in msg, msg  # and the fix, as a user sets it

        none = ray.get(_fresh(_activate, {"MESH_RAY_CACHE_DIR": cache}).remote(src), timeout=TIMEOUT_S)
        assert "(found: no ComfyUI on this node)" in none.get("error", ""), none

        # The same version configured on the worker's node is used (same content, another folder).
        same = ray.get(_fresh(_activate, {"MESH_RAY_CACHE_DIR": cache, WORKER_PATH_ENV: str(comfyui_dir)})
                       .remote(src), timeout=TIMEOUT_S)
        assert same.get("where") == str(comfyui_dir), same
    finally:
        ray.kill(owner)


# -- 4. a ComfyUI process that reconnected to Ray ships again -----------------------------------

RECONNECT = r"""
import json, os, sys
import ray
copy, work, stubs = sys.argv[1], sys.argv[2], sys.argv[3]
sys.pycache_prefix = os.path.join(work, "pycache")
sys.path[:0] = [copy, stubs]
import comfy.cli_args
from comfy_integration.comfy_env import ComfySource

def activate(src):
    return src.activate(cpu=True)

out = []
os.environ["MESH_RAY_COMFY_SHIP"] = "always"  # as a ComfyUI user chooses it (the node has no such input)
for session in range(2):  # as the bridge does when its cluster came back: ray.shutdown(), ray.init()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    src = ComfySource.here().for_actors()
    os.rename(copy, copy + ".away")  # the worker must take the shipped copy
    try:
        env = {"MESH_RAY_CACHE_DIR": os.path.join(work, f"node{session}", "shards")}  # a new node each time
        task = ray.remote(max_calls=1, runtime_env={"env_vars": env})(activate)
        out.append(ray.get(task.remote(src), timeout=300))
    finally:
        os.rename(copy + ".away", copy)
    ray.shutdown()
print(json.dumps(out))
"""


def test_after_a_reconnect_the_copy_is_shipped_from_the_new_session(comfyui_dir, tmp_path):
    from comfy_integration.comfy_env import tree_digest

    copy = _copy_tree(comfyui_dir, tmp_path / "copy-of-comfyui")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(h.REPO)
    out = subprocess.run([sys.executable, "-c", RECONNECT, str(copy), str(tmp_path), h.stubs_of(comfyui_dir) or ""], capture_output=True,
                         text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    digest = tree_digest(str(comfyui_dir))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        str(tmp_path / f"node{i}" / "comfyui" / digest) for i in range(2)]  # each session's worker got the copy


def test_an_unknown_ship_setting_is_one_line(monkeypatch):
    from comfy_integration.comfy_env import SHIP_ENV, ComfySource
    from mesh_ray.errors import ConfigError

    monkeypatch.setenv(SHIP_ENV, "sometimes")
    with pytest.raises(ConfigError, match=r"^MESH_RAY_COMFY_SHIP='sometimes' is not known: use one of auto, "
                                          r"always, never$"):
        ComfySource.here()
