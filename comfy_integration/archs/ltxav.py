"""LTX 2.x video + audio (LTXAV, LTX 2.3): ``comfy.ldm.lightricks.av_model.LTXAVModel``.

Every block is ``("double_block", i)`` and takes ``img = (video tokens, audio tokens)``: both
streams go through the remote blocks and both come back.  The timesteps (some as
``CompressedTimestep``, one row per frame) change every step; the contexts, masks and the rotary
and cross-modal embeddings stay for the whole generation.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Arch, BlockList, Unsliceable

TIMESTEPS = ("v_timestep", "a_timestep", "v_cross_scale_shift_timestep", "a_cross_scale_shift_timestep",
             "v_cross_gate_timestep", "a_cross_gate_timestep", "v_prompt_timestep", "a_prompt_timestep")
CONSTANTS = ("v_context", "a_context", "attention_mask", "v_pe", "a_pe", "v_cross_pe", "a_cross_pe",
             "self_attention_mask")


class LTXAV(Arch):
    name = "ltxav"
    title = "LTX 2.x (LTXAV)"
    image_models = ("ltxav",)
    model_class = "comfy.ldm.lightricks.av_model.LTXAVModel"
    lists = (BlockList("double_block", "transformer_blocks", "blocks"),)
    STEP = TIMESTEPS
    CONSTS = CONSTANTS

    def streams(self, kind: str, args: dict) -> dict[str, torch.Tensor]:
        vx, ax = args["img"]
        return {"vx": vx, "ax": ax}

    def result(self, kind: str, streams: dict[str, torch.Tensor]) -> dict:
        return {"img": (streams["vx"], streams["ax"])}

    def cut(self, value: Any, sl: slice, batch: int) -> Any:
        if type(value).__name__ == "CompressedTimestep":  # __slots__ record: data is [batch, frames, dim]
            if value.batch_size != batch:
                raise Unsliceable
            out = object.__new__(type(value))
            for name in type(value).__slots__:
                setattr(out, name, getattr(value, name))
            out.data = value.data[sl]
            out.batch_size = out.data.shape[0]
            return out
        return super().cut(value, sl, batch)

    def run_block(self, block: torch.nn.Module, kind: str, streams: dict[str, torch.Tensor], values: dict,
                  to: dict) -> dict[str, torch.Tensor]:
        named = {n: values[n] for n in TIMESTEPS[:6] + CONSTANTS[:7]}
        vx, ax = block((streams["vx"], streams["ax"]), **named, transformer_options=to,
                       self_attention_mask=values.get("self_attention_mask"),
                       v_prompt_timestep=values.get("v_prompt_timestep"), a_prompt_timestep=values.get("a_prompt_timestep"))
        return {"vx": vx, "ax": ax}
