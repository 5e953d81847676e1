"""Wan 2.1 / 2.2 (text and image to video): ``comfy.ldm.wan.model.WanModel``.

Every block is ``("double_block", i)``: ``img`` flows; ``vec`` (the step's modulation ``e0``)
changes every step; the text (with the CLIP image tokens in front for I2V) and the rotary ``pe``
stay for the generation, and so does ``context_img_len`` (how many image tokens lead the text),
which only ``block_wrap``'s closure holds.  VACE, camera, S2V and the other Wan variants call more
per block and are other classes: not supported.
"""

from __future__ import annotations

import torch

from .base import Arch, BlockList


class Wan(Arch):
    name = "wan"
    title = "Wan 2.1/2.2"
    image_models = ("wan2.1",)
    model_class = "comfy.ldm.wan.model.WanModel"
    lists = (BlockList("double_block", "blocks", "blocks"),)
    STEP = ("vec",)
    CONSTS = ("txt", "pe")
    CLOSURE = {"context_img_len": "const"}
    BLOCK_PATCHES = ("attn1_patch", "attn2_patch")

    def run_block(self, block: torch.nn.Module, kind: str, streams: dict[str, torch.Tensor], values: dict,
                  to: dict) -> dict[str, torch.Tensor]:
        return {"img": block(streams["img"], context=values["txt"], e=values["vec"], freqs=values["pe"],
                             context_img_len=values.get("context_img_len"), transformer_options=to)}
