"""FLUX.1 (dev, schnell) and FLUX.2 (Dev, Klein): ``comfy.ldm.flux.model.Flux``.

Double blocks take ``img``, ``txt`` and return both; then the forward joins them (text first) and
the single blocks take the joined stream.  ``vec`` is the step's conditioning vector (FLUX.1) or the
precomputed modulation (FLUX.2: ``ModulationOut`` records); ``pe`` and ``attn_mask`` stay for the
whole generation.  ``extra_kwargs`` (the modulation dims of FLUX.2 reference latents with
``index_timestep_zero``) only lives in ``block_wrap``'s closure.  A range that crosses from double
to single blocks runs when the forward reaches the first single block (FLUX.2 computes the single
blocks' modulation only after the double blocks): the bridge holds the double call until then.
"""

from __future__ import annotations

import torch

from .base import Arch, BlockList


class Flux(Arch):
    name = "flux1"
    title = "FLUX.1"
    image_models = ("flux",)
    model_class = "comfy.ldm.flux.model.Flux"
    lists = (BlockList("double_block", "double_blocks", "double"), BlockList("single_block", "single_blocks", "single"))
    STEP = ("vec",)
    CONSTS = ("pe", "attn_mask")
    CLOSURE = {"extra_kwargs": "step"}
    BLOCK_PATCHES = ("attn1_patch", "attn1_output_patch")

    def streams(self, kind: str, args: dict) -> dict[str, torch.Tensor]:
        return {"img": args["img"], "txt": args["txt"]} if kind == "double_block" else {"img": args["img"]}

    def result(self, kind: str, streams: dict[str, torch.Tensor]) -> dict:
        return {k: streams[k] for k in (("img", "txt") if kind == "double_block" else ("img",))}

    def enter(self, kind: str, streams: dict[str, torch.Tensor], values: dict) -> dict[str, torch.Tensor]:
        if kind == "single_block" and "txt" in streams:  # what the forward does between the two lists
            img, txt = streams["img"], streams["txt"]
            if img.dtype == torch.float16:
                img = torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504)
            return {"img": torch.cat((txt, img), 1)}
        return streams

    def run_block(self, block: torch.nn.Module, kind: str, streams: dict[str, torch.Tensor], values: dict,
                  to: dict) -> dict[str, torch.Tensor]:
        extra = values.get("extra_kwargs") or {}
        if kind == "double_block":
            img, txt = block(img=streams["img"], txt=streams["txt"], vec=values["vec"], pe=values["pe"],
                             attn_mask=values.get("attn_mask"), transformer_options=to, **extra)
            return {"img": img, "txt": txt}
        return {"img": block(streams["img"], vec=values["vec"], pe=values["pe"], attn_mask=values.get("attn_mask"),
                             transformer_options=to, **extra)}


class Flux2(Flux):
    name = "flux2"
    title = "FLUX.2"
    image_models = ("flux2",)
