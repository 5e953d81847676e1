"""split.set_loras on real Ray: LoRA files in the BFL/ComfyUI, kohya and diffusers PEFT layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mesh_ray.errors import CheckpointError

from helpers import inputs, kill_actor, local_model

RANK, ALPHA = 4, 2.0
TARGETS = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_mlp.0.weight",
           "single_blocks.1.linear1.weight", "single_blocks.3.linear2.weight"]
STAGES = [{"blocks": "double:0-1", "local": True}, "single:0-1", "single:2-3"]  # patches land here and remote


def lora_weights(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    shapes = dict(model.named_parameters())
    return {k: (torch.randn(shapes[k].shape[0], RANK, generator=g) * 0.1,
                torch.randn(RANK, shapes[k].shape[1], generator=g) * 0.1) for k in TARGETS}


def bfl_file(path, lw, prefix="diffusion_model."):
    sd = {}
    for k, (up, down) in lw.items():
        m = prefix + k[: -len(".weight")]
        sd[f"{m}.lora_up.weight"], sd[f"{m}.lora_down.weight"], sd[f"{m}.alpha"] = up, down, torch.tensor(ALPHA)
    save_file(sd, str(path))
    return path


def kohya_file(path, lw):
    sd = {}
    for k, (up, down) in lw.items():
        m = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        sd[f"{m}.lora_up.weight"], sd[f"{m}.lora_down.weight"], sd[f"{m}.alpha"] = up, down, torch.tensor(ALPHA)
    save_file(sd, str(path))
    return path


def patched_reference(model, lw, strength):
    """The model with W += strength * alpha/rank * up @ down on each target (the LoRA definition)."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, (up, down) in lw.items():
            params[k] += strength * (ALPHA / RANK) * (up @ down)
    return model


def test_set_loras_bfl_and_kohya_layouts_patch_local_and_remote_blocks(mesh, tiny_ckpts, tmp_path):
    path = tiny_ckpts["flux1"]
    model = local_model(path)
    args = inputs(model.config)
    lw = lora_weights(model)
    with torch.inference_mode():
        base = model(*args)
    split = mesh.split(str(path), stages=STAGES)
    try:
        dg = split.set_loras([(bfl_file(tmp_path / "bfl.safetensors", lw), 0.8)])
        out_bfl = split(*args)
        assert [i.get("lora") for i in split.stage_info()[1:]] == [dg, dg]
        split.set_loras([(kohya_file(tmp_path / "kohya.safetensors", lw), 0.8)])
        out_kohya = split(*args)
        split.set_loras([])  # removed: the base weights come back exactly
        out_none = split(*args)
    finally:
        split.close()
    with torch.inference_mode():
        ref = patched_reference(model, lw, 0.8)(*args)
    assert torch.allclose(out_bfl, ref, atol=1e-5, rtol=0), float((out_bfl - ref).abs().max())
    assert float((out_bfl - base).abs().max()) > 1e-3  # the LoRA changes the output
    assert torch.equal(out_kohya, out_bfl)
    assert torch.equal(out_none, base)


def test_a_restarted_stage_gets_its_lora_again_before_the_step_is_retried(mesh, tiny_ckpts, tmp_path):
    path = tiny_ckpts["flux1"]
    model = local_model(path)
    args = inputs(model.config)
    lw = lora_weights(model)
    split = mesh.split(str(path), stages=STAGES)
    try:
        dg = split.set_loras([(bfl_file(tmp_path / "bfl.safetensors", lw), 0.8)])
        patched = split(*args)
        kill_actor(split.segments[2].actor)  # Ray starts it again with the base weights only
        again = split(*args)  # the step meets the restarted stage: reloaded, re-patched, retried
        assert split.recovery.restarts == 1 and split.recovery.retries == 1
        assert [i.get("lora") for i in split.stage_info()[1:]] == [dg, dg]
    finally:
        split.close()
    assert torch.equal(again, patched)


def test_set_loras_diffusers_layout_maps_q_k_v_to_fused_slices(mesh, tiny_ckpts, tmp_path):
    path = tiny_ckpts["flux1"]
    model = local_model(path)
    cfg = model.config
    h, g = cfg.hidden_size, torch.Generator().manual_seed(9)
    parts = {n: (torch.randn(h, RANK, generator=g) * 0.1, torch.randn(RANK, h, generator=g) * 0.1)
             for n in ("to_q", "to_k", "to_v")}
    sd = {}
    for n, (up, down) in parts.items():  # diffusers PEFT names: lora_B = up, lora_A = down
        sd[f"transformer.single_transformer_blocks.2.attn.{n}.lora_B.weight"] = up
        sd[f"transformer.single_transformer_blocks.2.attn.{n}.lora_A.weight"] = down
    save_file(sd, str(tmp_path / "peft.safetensors"))
    args = inputs(cfg)
    split = mesh.split(str(path), stages=STAGES)
    try:
        split.set_loras([(tmp_path / "peft.safetensors", 1.0)])
        out = split(*args)
    finally:
        split.close()
    with torch.no_grad():  # q, k, v are the first three hidden-wide row blocks of the fused linear1
        w = dict(model.named_parameters())["single_blocks.2.linear1.weight"]
        for j, (up, down) in enumerate(parts.values()):
            w[j * h:(j + 1) * h] += up @ down
    with torch.inference_mode():
        ref = model(*args)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), float((out - ref).abs().max())


def test_lora_for_another_model_is_a_one_line_error(mesh, tiny_ckpts, tmp_path):
    save_file({"lora_unet_input_blocks_0_0.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_input_blocks_0_0.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "sd15.safetensors"))
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=2)
    try:
        with pytest.raises(CheckpointError, match="no LoRA weights for this model's blocks"):
            split.set_loras([(tmp_path / "sd15.safetensors", 1.0)])
        with pytest.raises(CheckpointError, match="LoRA file not found"):
            split.set_loras([(tmp_path / "missing.safetensors", 1.0)])
    finally:
        split.close()
