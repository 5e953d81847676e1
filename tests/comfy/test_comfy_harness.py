"""The harness itself: a real ComfyUI process, small FLUX.1 through ComfyUI's classes, real KSampler."""

from __future__ import annotations

import comfy_host as h


def _sample_twice():
    import torch

    model = h.flux_patcher(seed=0)
    a = h.ksample(model, seed=5)
    b = h.ksample(model, seed=5)
    c = h.ksample(model, seed=6)
    return tuple(a.shape), bool(torch.isfinite(a).all()), torch.equal(a, b), float((a - c).abs().max())


def test_small_flux_samples_deterministically_in_real_comfyui(comfy):
    shape, finite, same, diff = comfy(_sample_twice)
    assert shape == (1, 16, 16, 16) and finite and same
    assert diff > 1e-3  # another seed gives another latent


def _paths():
    import sys

    import comfy.model_management as mm
    import folder_paths

    return {"device": str(mm.get_torch_device()), "output": folder_paths.get_output_directory(),
            "stub": any(p.endswith("comfyui-stubs") for p in sys.path)}


def test_comfyui_runs_on_cpu_with_temporary_folders(comfy, comfyui_dir):
    import sys

    got = comfy(_paths)
    assert got["device"] == "cpu" and got["stub"]
    assert not got["output"].startswith(str(comfyui_dir))
    assert not any(p.endswith("comfyui-stubs") for p in sys.path)  # the stand-in stays in the host
