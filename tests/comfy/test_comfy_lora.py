"""LoRAs loaded before MeshSplitFlux reach the remote blocks (lora/loha/lokr), shipped once per set."""

from __future__ import annotations

import comfy_host as h

RTOL = 1e-5  # as in test_comfy_split: max |split - unsplit| <= RTOL * max |unsplit|


def _lora_split():
    import os

    import folder_paths
    import nodes

    name = "mesh-test-lora.safetensors"
    h.write_test_lora(os.path.join(folder_paths.get_folder_paths("loras")[0], name))
    model = h.flux_patcher(seed=0)
    with_lora = lambda s: nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, s)[0]
    mesh, = h.run_node("MeshConnect", address="")
    split = lambda m: h.run_node("MeshSplitFlux", model=m, mesh=mesh, n_blocks_remote=4, stages="", codec_mode="raw",
                                 forward_loras=True, unique_id="lora")[0]
    plain = h.ksample(model, seed=2, steps=2)
    runs = []
    for strength in (1.0, 1.0, 0.5, None):  # same set twice, a new strength, then no LoRA
        m = with_lora(strength) if strength is not None else model
        ref = h.ksample(m, seed=2, steps=2)
        s = split(m)
        out = h.ksample(s, seed=2, steps=2)
        out2 = h.ksample(s, seed=2, steps=2)  # the next queue of the same graph
        remote = h.remote_of(s)
        runs.append({"strength": strength, "diff": float((out - ref).abs().max()),
                     "diff2": float((out2 - ref).abs().max()), "scale": float(ref.abs().max()),
                     "lora_effect": float((ref - plain).abs().max()), "ships": remote.lora_ships,
                     "builds": remote.builds})
    # Without forwarding, the remote blocks run unpatched: the result must be measurably off.
    m = with_lora(1.0)
    off, = h.run_node("MeshSplitFlux", model=m, mesh=mesh, n_blocks_remote=4, stages="", codec_mode="raw",
                      forward_loras=False, unique_id="lora")
    unforwarded = float((h.ksample(off, seed=2, steps=2) - h.ksample(m, seed=2, steps=2)).abs().max())
    h.remote_of(off).close()
    return {"runs": runs, "unforwarded": unforwarded}


def test_lora_before_the_node_equals_unsplit_and_ships_once_per_set(comfy_old):
    got = comfy_old(_lora_split)
    runs = got["runs"]
    for r in runs:
        assert r["diff"] <= RTOL * r["scale"] and r["diff2"] <= RTOL * r["scale"], r
    assert runs[0]["lora_effect"] > 1e-3 and runs[2]["lora_effect"] > 1e-3  # the LoRA changes the image
    assert got["unforwarded"] > 100 * RTOL * runs[0]["scale"]  # and its remote part matters
    assert runs[3]["lora_effect"] == 0.0
    # initial set, (same set: nothing), new strength, removal; the stages were never restarted
    assert [r["ships"] for r in runs] == [1, 1, 2, 3], runs
    assert {r["builds"] for r in runs} == {1}


def _lora_after_the_node():
    import os

    import folder_paths
    import nodes

    name = "mesh-test-lora-after.safetensors"
    h.write_test_lora(os.path.join(folder_paths.get_folder_paths("loras")[0], name), seed=6)
    model = h.flux_patcher(seed=0)
    mesh, = h.run_node("MeshConnect", address="")
    lora = lambda m: nodes.LoraLoaderModelOnly().load_lora_model_only(m, name, 1.0)[0]
    split = lambda m, key, fwd: h.run_node("MeshSplitFlux", model=m, mesh=mesh, n_blocks_remote=4, stages="",
                                           codec_mode="raw", forward_loras=fwd, unique_id=key)[0]
    s_after = lora(split(model, "after", True))  # the LoRA placed after the node
    s_local = split(lora(model), "before", False)  # before the node, not forwarded: local blocks only
    after, local_only = h.ksample(s_after, seed=2, steps=2), h.ksample(s_local, seed=2, steps=2)
    s_full = split(lora(model), "before", True)
    full = h.ksample(s_full, seed=2, steps=2)
    for m in (s_after, s_full):
        h.remote_of(m).close()
    return {"after_vs_local_only": float((after - local_only).abs().max()),
            "after_vs_full": float((after - full).abs().max()), "scale": float(full.abs().max())}


def test_lora_after_the_node_patches_only_local_blocks(comfy_old):
    got = comfy_old(_lora_after_the_node)
    assert got["after_vs_local_only"] <= RTOL * got["scale"], got
    assert got["after_vs_full"] > 100 * RTOL * got["scale"], got
