"""MeshAutoCPUOffload in the real ComfyUI, each version: same latent as without it through a real KSampler,
weights on the host between passes, nothing left behind after the queue, the input MODEL untouched."""

from __future__ import annotations

import comfy_host as h

WINDOW = 2


def _sample(model, callback=None):
    """ComfyUI's KSampler path (``comfy.sample.sample``) with a per-step callback."""
    import comfy.sample
    import torch

    pos, neg = h.conditioning()
    latent = torch.zeros(1, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 5)
    return comfy.sample.sample(model, noise, 3, 2.0, "euler", "simple", pos, neg, latent, callback=callback, seed=5,
                               disable_pbar=True)


def _hooks(module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def _offload_run():
    import torch

    from comfy_integration.nodes_offload import offload_runs

    model = h.flux_patcher(seed=0)
    dm = model.model.diffusion_model
    home = {n: p.data_ptr() for n, p in dm.named_parameters()}
    blocks = {".".join(n.split(".")[:2]) for n in home if n.startswith(("double_blocks.", "single_blocks."))}
    hooks_before = _hooks(dm)
    ref = _sample(model)

    (streamed,) = h.run_node("MeshAutoCPUOffload", model=model, enable=True, window_size=WINDOW, pin_memory=True)
    (run,) = offload_runs(streamed)
    between = []

    def step(i, x0, x, total):
        # Between two passes: which blocks have their weights away from their host tensors?
        away = {".".join(n.split(".")[:2]) for n, p in dm.named_parameters()
                if n in home and n.split(".")[0] in ("double_blocks", "single_blocks") and p.data_ptr() != home[n]}
        between.append({"away": sorted(away), "passes": run.active.stats()["passes"],
                        # what ComfyUI's model management counts as loaded on the device for this model
                        "comfy_loaded": streamed.model.model_loaded_weight_memory,
                        "comfy_lowvram": bool(streamed.model.model_lowvram)})

    outs = [_sample(streamed, step) for _ in range(2)]  # two queues: nothing may leak from the first
    after_ptrs_same = all(p.data_ptr() == home[n] for n, p in dm.named_parameters())
    again = _sample(model)  # the input MODEL, unsplit and un-streamed, still gives the same latent
    return {"blocks": len(blocks), "model_bytes": model.model_size(), "equal": [bool(torch.equal(o, ref)) for o in outs],
            "max_diff": max(float((o - ref).abs().max()) for o in outs), "between": between,
            "stats": run.last_stats, "runs": run.runs, "active_after": run.active is not None,
            "hooks_left": _hooks(dm) - hooks_before, "ptrs_back": after_ptrs_same,
            "input_untouched": (type(model).__name__, len(offload_runs(model)), bool(torch.equal(again, ref))),
            "clone_class": type(streamed).__name__}


def test_offload_gives_the_same_latent_and_keeps_weights_on_the_host(comfy_each):
    got = comfy_each(_offload_run)
    assert got["equal"] == [True, True], got["max_diff"]  # fp32 on CPU: bit for bit
    assert got["blocks"] == 6 > WINDOW
    # Between passes at most the window is away from host memory (the prefetched head of the next pass).
    assert got["between"] and all(0 < len(b["away"]) <= WINDOW for b in got["between"]), got["between"]
    assert [b["passes"] for b in got["between"]] == [1, 2, 3, 1, 2, 3]
    # ComfyUI loaded the clone through its low-VRAM path with a zero budget: it counts (almost) none
    # of the weights as on the device, so nothing is loaded twice beside the streamed window.
    assert all(b["comfy_lowvram"] and b["comfy_loaded"] < 0.05 * got["model_bytes"] for b in got["between"]), (got["model_bytes"], got["between"])
    s = got["stats"]
    assert s["traces"] == 1 and s["passes"] == 3 and s["loads"] >= 3 * 6 - WINDOW
    assert got["runs"] == 2 and not got["active_after"]
    assert got["hooks_left"] == 0 and got["ptrs_back"]
    assert got["input_untouched"] == ("ModelPatcher", 0, True)
    assert got["clone_class"] == "StreamedModelPatcher"


def _disabled_and_bad_window():
    from mesh_ray.errors import MeshError

    model = h.flux_patcher(seed=0)
    (same,) = h.run_node("MeshAutoCPUOffload", model=model, enable=False, window_size=2, pin_memory=False)
    try:
        (streamed,) = h.run_node("MeshAutoCPUOffload", model=model, enable=True, window_size=2, pin_memory=False,
                                 max_device_gb=1e-9)
        _sample(streamed)
        err = None
    except MeshError as e:
        err = f"{type(e).__name__}: {e}"
    return same is model, err


def test_disabled_passes_the_model_through_and_a_tiny_budget_is_a_one_line_error(comfy_each):
    same, err = comfy_each(_disabled_and_bad_window)
    assert same
    assert err is not None and err.startswith("ConfigError: offload max_device_bytes=1 is smaller than") and "\n" not in err
