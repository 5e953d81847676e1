"""Qwen-Image (and its edit models): ``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``.

Every block is ``("double_block", i)``: ``img`` and ``txt`` flow (the block returns them as
``(txt, img)``); ``vec`` (``temb``) changes every step; the rotary ``pe`` stays for the generation,
as do the text mask and ``timestep_zero_index`` (reference latents with ``index_timestep_zero``),
which only ``block_wrap``'s closure holds.  ``patches["double_block"]`` and ControlNet adds run in
the forward between blocks: a split refuses them.
"""

from __future__ import annotations

import torch

from .base import Arch, BlockList


class QwenImage(Arch):
    name = "qwen"
    title = "Qwen-Image"
    image_models = ("qwen_image",)
    model_class = "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel"
    lists = (BlockList("double_block", "transformer_blocks", "blocks"),)
    STEP = ("vec",)
    CONSTS = ("pe",)
    CLOSURE = {"encoder_hidden_states_mask": "const", "timestep_zero_index": "const"}
    BLOCK_PATCHES = ("attn1_patch",)
    DRIVER_PATCHES = ("double_block",)

    def streams(self, kind: str, args: dict) -> dict[str, torch.Tensor]:
        return {"img": args["img"], "txt": args["txt"]}

    def run_block(self, block: torch.nn.Module, kind: str, streams: dict[str, torch.Tensor], values: dict,
                  to: dict) -> dict[str, torch.Tensor]:
        txt, img = block(hidden_states=streams["img"], encoder_hidden_states=streams["txt"],
                         encoder_hidden_states_mask=values.get("encoder_hidden_states_mask"), temb=values["vec"],
                         image_rotary_emb=values["pe"], timestep_zero_index=values.get("timestep_zero_index"),
                         transformer_options=to)
        return {"img": img, "txt": txt}
