"""The harness itself, on each ComfyUI version: a real ComfyUI process of the version its variable
names, small FLUX.1 through ComfyUI's classes, real KSampler; the child-process ComfyUI too."""

from __future__ import annotations

import comfy_host as h
from comfy_proc import ComfyProcess


def _sample_twice():
    import torch

    model = h.flux_patcher(seed=0)
    a = h.ksample(model, seed=5)
    b = h.ksample(model, seed=5)
    c = h.ksample(model, seed=6)
    return tuple(a.shape), bool(torch.isfinite(a).all()), torch.equal(a, b), float((a - c).abs().max())


def test_small_flux_samples_deterministically_in_real_comfyui(comfy_each):
    shape, finite, same, diff = comfy_each(_sample_twice)
    assert shape == (1, 16, 16, 16) and finite and same
    assert diff > 1e-3  # another seed gives another latent


def _where():
    import os
    import sys

    import comfy
    import comfy.model_management as mm
    import comfyui_version
    import folder_paths
    import nodes

    return {"device": str(mm.get_torch_device()), "output": folder_paths.get_output_directory(),
            "stub": any(p.endswith("comfyui-stubs") for p in sys.path), "version": comfyui_version.__version__,
            "comfy": os.path.realpath(list(comfy.__path__)[0]), "nodes": len(nodes.NODE_CLASS_MAPPINGS),
            "argv": sys.argv[:1]}


def test_comfyui_runs_on_cpu_with_temporary_folders(comfy_each, comfyui_each_dir):
    import sys

    from comfy_integration.comfy_env import tree_version

    got = comfy_each(_where)
    assert got["device"] == "cpu" and got["stub"]
    assert not got["output"].startswith(str(comfyui_each_dir))
    assert not any(p.endswith("comfyui-stubs") for p in sys.path)  # the stand-in stays in the host
    # the version its variable names, imported from that tree, with ComfyUI's core nodes
    assert got["version"] == tree_version(comfyui_each_dir) != "unknown"
    assert got["comfy"] == str((comfyui_each_dir / "comfy").resolve())
    assert got["nodes"] > 50
    assert got["argv"] != ["main.py"]  # the worker's own argv is back after ComfyUI parsed ours


def test_the_two_variables_name_two_versions(comfyui_dir, comfyui_old_dir):
    from comfy_integration.comfy_env import tree_version

    def key(v: str) -> tuple:
        return tuple(int(x) for x in v.split(".")[:3])

    new, old = tree_version(comfyui_dir), tree_version(comfyui_old_dir)
    assert key(new) >= (0, 20) and key(old) < key(new), (new, old)  # not swapped, and new is the 0.20 line


def _in_child():
    import comfy.model_management as mm
    import comfyui_version

    return comfyui_version.__version__, str(mm.get_torch_device())


def test_comfyui_in_a_child_process_boots(comfyui_each_dir, tmp_path):
    from comfy_integration.comfy_env import tree_version

    proc = ComfyProcess(h.REPO, comfyui_each_dir, tmp_path / "comfy", tmp_path / "comfy.log")
    try:
        assert proc.call(_in_child, timeout=300) == (tree_version(comfyui_each_dir), "cpu")
    finally:
        proc.close()
