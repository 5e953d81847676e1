"""MeshSplitFlux in the real ComfyUI: a real KSampler run split over stages equals the unsplit run."""

from __future__ import annotations

import pytest

import comfy_host as h

# float32 bound: the split runs the same float32 block math in another process (mesh-ray's blocks
# instead of ComfyUI's), so only the order of float32 roundings differs.  Bound: max |split - unsplit|
# <= 1e-5 * max |unsplit| over the final latent (about 80 float32 ulps; measured: 2 ulps).
RTOL = 1e-5


def _split_vs_unsplit(n_blocks_remote: int, stages: str, micro_batches: int = 1):
    import torch

    model = h.flux_patcher(seed=0)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    ref = h.ksample(model, seed=11)
    mesh, = h.run_node("MeshConnect", address="")
    split, = h.run_node("MeshSplitFlux", model=model, mesh=mesh, n_blocks_remote=n_blocks_remote, stages=stages,
                        codec_mode="raw", micro_batches=micro_batches, unique_id=f"eq-{n_blocks_remote}-{stages}")
    out = h.ksample(split, seed=11)
    again = h.ksample(model, seed=11)  # the input MODEL still samples unsplit, unchanged
    intact = all(torch.equal(before[k], v) for k, v in model.model.diffusion_model.state_dict().items())
    remote = h.remote_of(split)
    info = remote.split.stage_info()
    calls = sum(s.get("calls", 0) for s in info if s.get("kind") == "stage")
    remote.close()
    return {"diff": float((out - ref).abs().max()), "scale": float(ref.abs().max()), "same_input": torch.equal(ref, again),
            "intact": intact, "calls": calls, "stages": [s["blocks"] for s in info]}


@pytest.mark.parametrize("n_blocks_remote,stages,n_stages,micro", [
    (5, "", 2, 1),                            # remote starts inside the double blocks
    (4, "", 2, 1),                            # at the double/single boundary
    (2, "", 2, 1),                            # inside the single blocks
    (0, "double:1-single:0; single:1-2; single:3", 4, 1),  # a 3-stage plan (front stays local)
    (0, "double:1-single:0; single:1-2; single:3", 4, 2),  # the same with CFG's halves as micro-batches
])
def test_split_ksampler_equals_unsplit(comfy_old, n_blocks_remote, stages, n_stages, micro):
    got = comfy_old(_split_vs_unsplit, n_blocks_remote, stages, micro)
    assert got["diff"] <= RTOL * got["scale"], got
    assert got["scale"] > 0.1 and got["same_input"] and got["intact"]
    assert len(got["stages"]) == n_stages
    # 3 sampler steps, CFG's halves in one batch: one call per remote stage and step and micro-batch
    assert got["calls"] == 3 * (n_stages - 1) * micro, got


def _loaded_bytes():
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    model = h.flux_patcher(seed=0)
    full = model.model_size()
    keys_before = len(model.model.diffusion_model.state_dict())
    dm = model.model.diffusion_model
    remote_ids = {id(p) for blk in list(dm.double_blocks)[1:] + list(dm.single_blocks) for p in blk.parameters()}
    remote = sum(p.numel() * p.element_size() for blk in list(dm.double_blocks)[1:] + list(dm.single_blocks)
                 for p in blk.parameters())
    mesh, = h.run_node("MeshConnect", address="")
    split, = h.run_node("MeshSplitFlux", model=model, mesh=mesh, n_blocks_remote=5, stages="", codec_mode="raw",
                        unique_id="bytes")
    seen = {}

    def on_load(patcher, device_to, *args):
        # What ComfyUI's model management moves: every parameter in the module tree while loading.
        seen["ids"] = {id(p) for p in patcher.model.parameters()}
        seen["bytes"] = mm.module_size(patcher.model)  # parameters and buffers, as ComfyUI counts them

    split.add_callback(pe.CallbacksMP.ON_LOAD, on_load)
    h.ksample(split, seed=1, steps=1)
    loaded = split.loaded_size()
    keys_after = len(model.model.diffusion_model.state_dict())  # the shared model is whole again
    mm.unload_all_models()
    h.remote_of(split).close()
    return {"full": full, "remote": remote, "seen": seen["bytes"], "overlap": len(seen["ids"] & remote_ids),
            "loaded": loaded, "size": split.model_size(), "whole_after": keys_after == keys_before}


def test_comfyui_loads_only_the_local_blocks(comfy_old):
    got = comfy_old(_loaded_bytes)
    assert got["remote"] > 0.5 * got["full"]  # 5 of 6 blocks: most of the model
    assert got["overlap"] == 0, got           # no remote-block parameter was in the tree ComfyUI loaded
    assert got["seen"] == got["full"] - got["remote"] == got["loaded"] == got["size"], got
    assert got["whole_after"]  # after sampling, other nodes see every block of the input model


def _reconfigure():
    import ray
    import torch

    model = h.flux_patcher(seed=0)
    ref = h.ksample(model, seed=4, steps=2)
    mesh, = h.run_node("MeshConnect", address="")
    out = []
    old_actors = []
    for n in (2, 5, 1):  # up, then down, the same node between queues
        split, = h.run_node("MeshSplitFlux", model=model, mesh=mesh, n_blocks_remote=n, stages="", codec_mode="raw",
                            unique_id="reconf")
        lat = h.ksample(split, seed=4, steps=2)
        remote = h.remote_of(split)
        out.append((n, float((lat - ref).abs().max()), [s["blocks"] for s in remote.split.stage_info()]))
        old_actors.append([s.actor for s in remote.split.segments if s.actor is not None])
    h.remote_of(split).close()
    dead = []
    for actors in old_actors[:-1]:
        for a in actors:
            try:
                ray.get(a.ready.remote(), timeout=30)
                dead.append(False)
            except Exception:  # noqa: BLE001 - RayActorError: killed as it should be
                dead.append(True)
    return {"runs": out, "old_dead": dead, "scale": float(ref.abs().max()), "finite": bool(torch.isfinite(ref).all())}


def test_reconfigure_up_and_down_between_queues(comfy_old):
    got = comfy_old(_reconfigure)
    assert [r[2][-1] for r in got["runs"]] == ["single:2-3", "double:1-single:3", "single:3-3"]
    assert all(r[1] <= RTOL * got["scale"] for r in got["runs"]), got
    assert got["old_dead"] and all(got["old_dead"])  # the stages of the previous plan were closed


def _stage_death():
    import ray

    model = h.flux_patcher(seed=0)
    ref = h.ksample(model, seed=8, steps=2)
    mesh, = h.run_node("MeshConnect", address="")
    split, = h.run_node("MeshSplitFlux", model=model, mesh=mesh, n_blocks_remote=3, stages="", codec_mode="raw",
                        unique_id="death")
    first = h.ksample(split, seed=8, steps=2)
    remote = h.remote_of(split)
    for seg in remote.split.segments:
        if seg.actor is not None:
            ray.kill(seg.actor)  # the stage's worker dies between two queues
    second = h.ksample(split, seed=8, steps=2)  # the same MODEL, as ComfyUI's cache hands it out again
    builds = remote.builds
    remote.close()
    return {"first": float((first - ref).abs().max()), "second": float((second - ref).abs().max()),
            "builds": builds, "scale": float(ref.abs().max())}


def test_killed_stage_is_recreated_on_the_next_queue(comfy_old):
    got = comfy_old(_stage_death)
    assert got["builds"] == 2, got
    assert got["first"] <= RTOL * got["scale"] and got["second"] <= RTOL * got["scale"], got


def _bad_inputs(closed_port: int):
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    from mesh_ray.errors import MeshError

    def err(fn):
        try:
            fn()
        except MeshError as e:
            return str(e)
        return None

    model = h.flux_patcher(seed=0)
    mesh, = h.run_node("MeshConnect", address="")
    not_flux = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), mm.get_torch_device(), mm.unet_offload_device())
    split = lambda m, **kw: h.run_node("MeshSplitFlux", model=m, mesh=mesh, **{"n_blocks_remote": 0, "stages": "",
                                                                             "codec_mode": "raw", **kw})
    unreachable = err(lambda: h.run_node("MeshConnect", address=f"127.0.0.1:{closed_port}", timeout_s=5.0))
    still, = h.run_node("MeshConnect", address="")  # the working connection survived the bad address
    good, = split(model, n_blocks_remote=2, unique_id="bad-chain")
    replaced = model.clone()  # another node already replaces a block that would go remote
    replaced.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "single_block", 3)
    out = {
        "not_flux": err(lambda: split(not_flux, n_blocks_remote=2)),
        "overlap": err(lambda: split(model, stages="double:1-single:1; single:1-3")),
        "past_end": err(lambda: split(model, stages="single:2-7")),
        "too_many": err(lambda: split(model, n_blocks_remote=9)),
        "gap": err(lambda: split(model, stages="double:0-0 local; single:0-3")),
        "replaced": err(lambda: split(replaced, n_blocks_remote=2)),
        "nothing": err(lambda: split(model)),
        "split_twice": err(lambda: split(good, n_blocks_remote=1)),
        "lossless_hevc": err(lambda: split(model, n_blocks_remote=1, codec_mode="hevc", codec_lossless=True)),
        "unreachable": unreachable,
    }
    h.remote_of(good).close()
    return {"errors": out, "same_mesh": still is mesh}


def test_bad_inputs_are_one_line_node_errors(comfy_old):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = comfy_old(_bad_inputs, port)
    errors = got["errors"]
    expect = {"not_flux": "needs a FLUX.1 model", "overlap": "overlaps", "past_end": "runs past the model",
              "too_many": "n_blocks_remote=9", "gap": "leaves a gap", "replaced": "already replaces single_block 3", "nothing": "nothing to split", "split_twice": "already split",
              "lossless_hevc": "lossless", "unreachable": "cannot reach a Ray cluster at 127.0.0.1"}
    for name, text in expect.items():
        assert errors[name] and text in errors[name], (name, errors[name])
        assert "\n" not in errors[name]
    assert got["same_mesh"]
