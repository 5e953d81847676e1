"""FLUX.2 block patches called the way newer ComfyUI calls them (modulation as a tuple).

The call convention is that of ComfyUI's FLUX forward with ``global_modulation`` (FLUX.2), read at
``comfy/ldm/flux/model.py`` (``Flux.forward_orig``) of silveroxides/ComfyUI commit
80f503ba4414fe4cf16d5753843cb42ea94b2af5 (a fork that tracks comfyanonymous/ComfyUI; the index of
the upstream repository held only pre-FLUX.2 versions) and ``comfy/ldm/flux/layers.py``
(``Modulation``, ``ModulationOut``, ``DoubleStreamBlock.forward``, ``SingleStreamBlock.forward``)
of glamlabs-app/ComfyUI commit 6424fced4f96c81dc8a5f9f5c4be4f190af9082f:

* modulation is computed once per forward, outside the blocks: ``Modulation`` returns
  ``(ModulationOut(shift, scale, gate), ModulationOut(...) or None)`` (dataclass records of
  [B, 1, hidden] tensors);
* a double block's patch gets ``{"img", "txt", "vec", "pe", "attn_mask", "transformer_options"}``
  with ``vec = (double_stream_modulation_img(v), double_stream_modulation_txt(v))``, i.e.
  ``((img_attn, img_mlp), (txt_attn, txt_mlp))``;
* after the double blocks, the streams are joined (text first) and ``vec, _ =
  single_stream_modulation(v)``; a single block's patch gets ``{"img", "vec", "pe", "attn_mask",
  "transformer_options"}`` with ``vec`` one ``ModulationOut``.

``comfy_style_forward`` below drives our own FLUX.2 model that way (no ComfyUI code is copied or
run: it is not the ComfyUI 0.3.64 in ../shared/comfyui, which has no FLUX.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mesh_ray.mesh import connect

from helpers import inputs, local_model


@dataclass
class ModulationOut:
    """The record type newer ComfyUI hands to FLUX.2 blocks (a dataclass, not a tuple)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def _comfy(mods) -> tuple:
    return tuple(ModulationOut(m.shift, m.scale, m.gate) for m in mods)


def comfy_style_forward(model, args, patches: dict) -> torch.Tensor:
    """Our FLUX.2 model, with ``patches_replace["dit"]`` entries called as newer ComfyUI calls them."""
    state, cond, pe = model.embed(*args)
    vec_orig = cond.vec
    vec = (_comfy(model.double_stream_modulation_img(vec_orig)), _comfy(model.double_stream_modulation_txt(vec_orig)))
    img, txt = state.img, state.txt
    for i, block in enumerate(model.double_blocks):
        if ("double_block", i) in patches:
            out = patches[("double_block", i)]({"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": None,
                                                "transformer_options": {}}, {"original_block": None})
            img, txt = out["img"], out["txt"]
        else:
            img, txt = block(img, txt, pe, cond)
    img = torch.cat((txt, img), 1)
    vec = _comfy(model.single_stream_modulation(vec_orig))[0]
    for i, block in enumerate(model.single_blocks):
        if ("single_block", i) in patches:
            img = patches[("single_block", i)]({"img": img, "vec": vec, "pe": pe, "attn_mask": None,
                                                "transformer_options": {}}, {"original_block": None})["img"]
        else:
            img = block(img, pe, cond)
    return model.final_layer(img[:, txt.shape[1]:], vec_orig)


LOCAL0 = {"blocks": "double:0-0", "local": True}


@pytest.mark.parametrize("plan,micro", [
    (dict(n_blocks_remote=5), 1),                                                       # double 1 .. single 3: crosses
    (dict(n_blocks_remote=3), 1),                                                       # single blocks only
    (dict(stages=[LOCAL0, "double:1-1", "single:0-3"]), 2),                             # 2 stages meeting at the boundary
    (dict(stages=[LOCAL0, "double:1-1", {"blocks": "single:0-3", "local": True}]), 1),  # double blocks only
])
def test_newer_comfyui_tuple_modulation_equals_our_forward(ray_local, tiny_ckpts, plan, micro):
    path = tiny_ckpts["flux2"]
    model = local_model(path)
    args = inputs(model.config, b=2)
    mesh = connect()
    try:
        split = mesh.split(str(path), load_local=False, micro_batches=micro, **plan)
        with torch.inference_mode():
            ref = model(*args)
            driver = comfy_style_forward(model, args, {})  # the driver itself reproduces our forward
            out = comfy_style_forward(model, args, split.block_patches())
            again = comfy_style_forward(model, args, split.block_patches())  # the held call does not leak
        scale = float(ref.abs().max())
        assert torch.equal(driver, ref)
        assert float((out - ref).abs().max()) <= 1e-5 * scale, float((out - ref).abs().max())
        assert torch.equal(out, again)
        calls = sum(s.get("calls", 0) for s in split.stage_info() if s.get("kind") == "stage")
        remote = len([s for s in split.stages if not s.spec.local])
        assert calls == 2 * remote * micro  # each forward ran every remote stage once (per micro-batch)
    finally:
        mesh.close()


def test_a_form_the_split_cannot_use_is_a_one_line_error(ray_local, tiny_ckpts):
    from mesh_ray.errors import ConfigError

    path = tiny_ckpts["flux2"]
    model = local_model(path)
    mesh = connect()
    try:
        split = mesh.split(str(path), n_blocks_remote=5, load_local=False)
        patch = split.block_patches()[("double_block", 1)]
        with torch.inference_mode():
            state, cond, pe = model.embed(*inputs(model.config))
        base = {"img": state.img, "txt": state.txt, "pe": pe, "attn_mask": None, "transformer_options": {}}
        with pytest.raises(ConfigError, match="FLUX.1 style") as e1:  # ComfyUI 0.3.64's FLUX.1 call
            patch({**base, "vec": cond.vec}, {})
        with pytest.raises(ConfigError, match="shift, scale, gate") as e2:  # not modulation records
            patch({**base, "vec": ((cond.vec, cond.vec), (cond.vec, cond.vec))}, {})
        assert "\n" not in str(e1.value) + str(e2.value)
    finally:
        mesh.close()
