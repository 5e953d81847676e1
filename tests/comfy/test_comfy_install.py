"""Install, on each ComfyUI version: ComfyUI's own loader finds mesh-ray in custom_nodes (repo clone
or comfy_integration alone); the pip entry point."""

from __future__ import annotations

import tomllib

import ray

import comfy_host as h
from comfy_host import CALL_TIMEOUT_S, REPO


def _load_repo():
    import os

    got = h.load_custom_nodes(os.environ["MESH_RAY_TEST_CUSTOM_NODE"])
    import nodes

    import comfy_integration

    info = {}
    for name in comfy_integration.NODE_CLASS_MAPPINGS:
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        types = cls.INPUT_TYPES()
        inputs = {k: v for part in ("required", "optional") for k, v in types.get(part, {}).items()}
        info[name] = {"category": cls.CATEGORY, "module": getattr(cls, "RELATIVE_PYTHON_MODULE", None), "display": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name),
                      "untipped": [k for k, v in inputs.items() if len(v) < 2 or not v[1].get("tooltip")]}
    return {"ok": list(got["ok"].values()), "new": got["new"], "expected": sorted(comfy_integration.NODE_CLASS_MAPPINGS),
            "web": got["web"], "info": info}


def test_comfyui_loader_finds_the_repo_in_custom_nodes(comfy_each):
    got = comfy_each(_load_repo)
    assert got["ok"] == [True]
    assert {"MeshConnect", "MeshSplitFlux"} <= set(got["expected"])
    for name, info in got["info"].items():
        assert info["module"] == "custom_nodes.mesh-ray", name  # registered by ComfyUI's loader
        assert info["category"] == "mesh" and info["display"], name
        assert info["untipped"] == [], f"{name} inputs without a tooltip: {info['untipped']}"
    assert any(d.endswith("comfy_integration/web") for d in got["web"].values())


def _load_package_alone(repo: str):
    import os
    from pathlib import Path

    import folder_paths

    link = Path(folder_paths.get_folder_paths("custom_nodes")[0]) / "mesh_ray_nodes"
    if not link.exists():
        link.symlink_to(os.path.join(repo, "comfy_integration"), target_is_directory=True)
    got = h.load_custom_nodes(str(link))
    return {"ok": list(got["ok"].values()), "new": got["new"]}


def test_comfyui_loader_finds_comfy_integration_alone(comfyui_each_dir, ray_local, tmp_path):
    # A fresh ComfyUI process: the package symlinked alone into its custom_nodes.
    ray.cloudpickle.register_pickle_by_value(h)
    host = h.ComfyHostActor.remote(str(REPO), str(comfyui_each_dir), h.stubs_of(comfyui_each_dir), str(tmp_path))
    try:
        got = ray.get(host.call.remote(_load_package_alone, str(REPO)), timeout=CALL_TIMEOUT_S)
    finally:
        ray.kill(host)
    assert got["ok"] == [True] and {"MeshConnect", "MeshSplitFlux"} <= set(got["new"])


def test_pip_entry_point_names_the_package():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["comfyui.custom_nodes"] == {"mesh_ray": "comfy_integration"}
    assert "comfy_integration*" in meta["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "comfy" in meta["project"]["optional-dependencies"]


def test_installed_entry_point_loads_as_the_pip_installable_comfyui_reads_it():
    """The one loader found that reads the ``comfyui.custom_nodes`` group is hiddenswitch's
    pip-installable ComfyUI fork (``comfy/nodes/package.py`` of hiddenswitch/pip-and-uv-installable-ComfyUI,
    commit 3e6191ffd8f73c7344eb506146a6f3357e5589f3): ``entry_points().select(group=...)``, then
    ``entry_point.load()`` must give a module, whose ``NODE_CLASS_MAPPINGS``,
    ``NODE_DISPLAY_NAME_MAPPINGS`` and ``WEB_DIRECTORY`` (a folder beside the module) it reads.
    Here: the installed package metadata of this environment, resolved the same way."""
    import os
    import types
    from importlib.metadata import PackageNotFoundError, distribution, entry_points

    import pytest

    try:
        distribution("mesh-ray")
    except PackageNotFoundError:
        pytest.skip("mesh-ray is not installed in this environment (pip install -e .): no entry point to resolve")
    eps = [ep for ep in entry_points().select(group="comfyui.custom_nodes") if ep.name == "mesh_ray"]
    assert len(eps) == 1, eps
    module = eps[0].load()
    assert isinstance(module, types.ModuleType) and module.__name__ == "comfy_integration"
    assert {"MeshConnect", "MeshSplitFlux", "MeshVAEDecode", "MeshSavePromisedImage",
            "MeshAutoCPUOffload"} <= set(module.NODE_CLASS_MAPPINGS)
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)
    web = os.path.join(os.path.dirname(module.__file__), module.WEB_DIRECTORY)
    assert os.path.isdir(web) and any(f.endswith(".js") for f in os.listdir(web))
