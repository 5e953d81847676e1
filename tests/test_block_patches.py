"""split.block_patches() with the arguments ComfyUI's FLUX.1 forward passes, and what it rejects."""

from __future__ import annotations

import pytest
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.mesh import connect

from helpers import inputs, local_model


def test_comfyui_style_args_run_the_remote_chain_and_bad_args_are_one_line(ray_local, tiny_ckpts):
    path = tiny_ckpts["flux1"]
    model = local_model(path)
    args = inputs(model.config)
    mesh = connect()
    split = mesh.split(str(path), n_blocks_remote=5, load_local=False)  # remote from double block 1
    try:
        patch = split.block_patches()[("double_block", 1)]
        with torch.inference_mode():
            state, cond, pe = model.embed(*args)
            state = model.run_blocks(state, cond, pe, 0, 1)
            ref = model.run_blocks(state, cond, pe, 1, 6)
            # exactly ComfyUI 0.3.64's keys: no "cond", the modulation input as "vec"
            out = patch({"img": state.img, "txt": state.txt, "vec": cond.vec, "pe": pe, "attn_mask": None,
                         "transformer_options": {}}, {"original_block": None})
        ref = ref.unjoin()
        assert torch.equal(out["img"], ref.img) and torch.equal(out["txt"], ref.txt)
        base = {"img": state.img, "txt": state.txt, "vec": cond.vec, "pe": pe, "transformer_options": {}}
        with pytest.raises(ConfigError, match="attention mask"):
            patch({**base, "attn_mask": torch.ones(1)}, {})
        with pytest.raises(ConfigError, match="FLUX.2 style"):  # precomputed modulation into a FLUX.1 split
            patch({**base, "vec": (cond.vec, cond.vec)}, {})
    finally:
        mesh.close()
