"""MeshSplitFlux in the real ComfyUI: a real KSampler run split over stages equals the unsplit run."""

from __future__ import annotations

import pytest

import comfy_host as h

# float32 bound: the split runs the same float32 block math in another process (mesh-ray's blocks
# instead of ComfyUI's), so only the order of float32 roundings differs.  Bound: max |split - unsplit|
# <= 1e-5 * max |unsplit| over the final latent (about 80 float32 ulps; measured: 2 ulps).
RTOL = 1e-5


def _split_vs_unsplit(n_blocks_remote: int, stages: str):
    import torch

    model = h.flux_patcher(seed=0)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    ref = h.ksample(model, seed=11)
    mesh, = h.run_node("MeshConnect", address="")
    split, = h.run_node("MeshSplitFlux", model=model, mesh=mesh, n_blocks_remote=n_blocks_remote, stages=stages,
                        codec_mode="raw", unique_id=f"eq-{n_blocks_remote}-{stages}")
    out = h.ksample(split, seed=11)
    again = h.ksample(model, seed=11)  # the input MODEL still samples unsplit, unchanged
    intact = all(torch.equal(before[k], v) for k, v in model.model.diffusion_model.state_dict().items())
    remote = h.remote_of(split)
    info = remote.split.stage_info()
    calls = sum(s.get("calls", 0) for s in info if s.get("kind") == "stage")
    remote.close()
    return {"diff": float((out - ref).abs().max()), "scale": float(ref.abs().max()), "same_input": torch.equal(ref, again),
            "intact": intact, "calls": calls, "stages": [s["blocks"] for s in info]}


@pytest.mark.parametrize("n_blocks_remote,stages,n_stages", [
    (5, "", 2),                            # remote starts inside the double blocks
    (4, "", 2),                            # at the double/single boundary
    (2, "", 2),                            # inside the single blocks
    (0, "double:1-single:0; single:1-2; single:3", 4),  # a 3-stage plan (front stays local)
])
def test_split_ksampler_equals_unsplit(comfy, n_blocks_remote, stages, n_stages):
    got = comfy(_split_vs_unsplit, n_blocks_remote, stages)
    assert got["diff"] <= RTOL * got["scale"], got
    assert got["scale"] > 0.1 and got["same_input"] and got["intact"]
    assert len(got["stages"]) == n_stages and got["calls"] > 0
