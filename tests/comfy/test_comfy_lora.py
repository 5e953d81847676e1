"""LoRAs loaded before Mesh Split Model reach the remote blocks through ComfyUI's own patch code
(lora in ComfyUI's and kohya's key layouts, loha, lokr), equal the unsplit run with the LoRA bit
for bit, and are shipped once per set (not again on the next queue, nor for the same set loaded
again); a LoRA after the node patches only the local blocks."""

from __future__ import annotations

import pytest

import comfy_host as h

PLANS = {"flux2": "double:1-single:2", "ltxav": "blocks:1-3"}


def _lora_split(arch: str, dtype: str):
    import os

    import folder_paths
    import nodes
    import torch

    from comfy_integration import tiny
    from comfy_integration.split_clone import layout_of
    from comfy_integration.archs import BY_NAME

    model = tiny.tiny_patcher(arch, getattr(torch, dtype), seed=0)
    layout = layout_of(model, BY_NAME[arch])
    name = f"mesh-lora-{arch}-{dtype}.safetensors"
    made = tiny.write_lora(model, os.path.join(folder_paths.get_folder_paths("loras")[0], name),
                      layout.prefixes(layout.parse(PLANS[arch])))
    folder_paths.filename_list_cache.clear()
    with_lora = lambda s: nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, s)[0]
    mesh, = h.run_node("MeshConnect", address="")

    def split(m, forward=True):
        return h.run_node("MeshSplitModel", model=m, mesh=mesh, n_blocks_remote=0, stages=PLANS[arch], codec_mode="raw",
                          forward_loras=forward, unique_id=f"lora-{arch}")[0]

    plain = tiny.sample(model, arch)
    runs = []
    for strength in (1.0, 1.0, 0.5, None):  # the same set twice (loaded again), a new strength, then no LoRA
        m = with_lora(strength) if strength is not None else model
        ref = tiny.sample(m, arch)
        s = split(m)
        out = tiny.sample(s, arch)
        out2 = tiny.sample(s, arch)  # the next queue of the same graph
        remote = h.remote_of(s)
        runs.append({"strength": strength, "diff": tiny.max_diff(out, ref), "diff2": tiny.max_diff(out2, ref),
                     "effect": tiny.max_diff(ref, plain), "ships": remote.patch_ships, "builds": remote.builds,
                     "patched": [i["lora"] is not None for i in remote.group.info()]})
    m = with_lora(1.0)
    off = split(m, forward=False)  # not forwarded: the remote blocks run unpatched, measurably off
    unforwarded = tiny.max_diff(tiny.sample(off, arch), tiny.sample(m, arch))
    h.remote_of(off).close()
    return {"runs": runs, "unforwarded": unforwarded, "made": made}


@pytest.mark.parametrize("arch,dtype", [("flux2", "float32"), ("flux2", "bfloat16"), ("ltxav", "bfloat16")])
def test_lora_before_the_node_equals_unsplit_and_ships_once_per_set(comfy, arch, dtype):
    got = comfy(_lora_split, arch, dtype)
    runs = got["runs"]
    assert got["made"]["kinds"] == ["kohya", "loha", "lokr", "lora"], got["made"]
    for r in runs:
        assert r["diff"] == 0.0 and r["diff2"] == 0.0, r
    assert runs[0]["effect"] > 1e-3 and runs[2]["effect"] > 1e-3 and runs[3]["effect"] == 0.0, runs
    assert got["unforwarded"] > 1e-4, got  # the remote part of the LoRA matters
    # first set; the same set loaded again: nothing; a new strength; removal; never a restart
    assert [r["ships"] for r in runs] == [1, 1, 2, 3], runs
    assert {r["builds"] for r in runs} == {1}, runs
    assert runs[0]["patched"] == [True] and runs[3]["patched"] == [False], runs


def _lora_after_the_node():
    import os

    import folder_paths
    import nodes

    from comfy_integration import tiny
    from comfy_integration.archs import BY_NAME
    from comfy_integration.split_clone import layout_of

    model = tiny.tiny_patcher("flux2", seed=0)
    layout = layout_of(model, BY_NAME["flux2"])
    name = "mesh-lora-after.safetensors"
    tiny.write_lora(model, os.path.join(folder_paths.get_folder_paths("loras")[0], name),
               layout.prefixes(layout.parse(PLANS["flux2"])), seed=6)
    folder_paths.filename_list_cache.clear()
    mesh, = h.run_node("MeshConnect", address="")
    lora = lambda m: nodes.LoraLoaderModelOnly().load_lora_model_only(m, name, 1.0)[0]
    split = lambda m, key, fwd: h.run_node("MeshSplitModel", model=m, mesh=mesh, n_blocks_remote=0,
                                           stages=PLANS["flux2"], codec_mode="raw", forward_loras=fwd, unique_id=key)[0]
    s_after = lora(split(model, "after", True))  # the LoRA placed after the node
    s_local = split(lora(model), "before", False)  # before the node, not forwarded: local blocks only
    after, local_only = tiny.sample(s_after, "flux2"), tiny.sample(s_local, "flux2")
    s_full = split(lora(model), "before", True)
    full = tiny.sample(s_full, "flux2")
    for m in (s_after, s_full):
        h.remote_of(m).close()
    return {"after_vs_local_only": tiny.max_diff(after, local_only), "after_vs_full": tiny.max_diff(after, full)}


def test_lora_after_the_node_patches_only_local_blocks(comfy):
    got = comfy(_lora_after_the_node)
    assert got["after_vs_local_only"] == 0.0, got
    assert got["after_vs_full"] > 1e-4, got
