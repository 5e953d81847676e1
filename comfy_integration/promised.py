"""The PROMISE value that Mesh VAE Decode hands to the save nodes, and what every saving node shares:
ComfyUI's file metadata and its ``executed`` event for a node that finished after its prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mesh_ray.vae.promise import Promise

from .registry import prompt_server


@dataclass
class PromisedImages:
    """A decode still running (or kept), with what the savers need: the decoded size (``width`` x
    ``height``), the number of images or frames (``batch``), whether they are a video's frames, and
    the promise of the LTX audio decoded beside them (``audio``: waveform ``[B, T, C]`` as ComfyUI's
    audio VAE gives it, at ``sample_rate``)."""

    promise: Promise
    width: int
    height: int
    batch: int
    video: bool = False
    audio: Promise | None = None
    sample_rate: int | None = None

    def audio_dict(self, timeout: float | None = None) -> dict | None:
        """The audio as ComfyUI's AUDIO (``{"waveform": [B, C, T], "sample_rate"}``, as LTXV Audio VAE
        Decode returns it), waiting for it; None without audio."""
        if self.audio is None:
            return None
        return audio_output(self.audio.result(timeout), self.sample_rate)


def audio_output(waveform: torch.Tensor, sample_rate: int) -> dict:
    """ComfyUI's AUDIO from an audio VAE's decode ``[B, T, C]`` (LTXVAudioVAEDecode's ``movedim(-1, 1)``)."""
    return {"waveform": waveform.movedim(-1, 1), "sample_rate": int(sample_rate)}


def comfy_metadata(prompt: Any, extra_pnginfo: Any) -> dict | None:
    """ComfyUI's file metadata: ``prompt`` and each ``extra_pnginfo`` entry (the workflow), as SaveImage and
    SaveVideo write them; None when ComfyUI runs with ``--disable-metadata``."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return None
    meta: dict = {}
    if prompt is not None:
        meta["prompt"] = prompt
    meta.update(extra_pnginfo or {})
    return meta


def send_executed(node: str | None, prompt_id: str | None, client_id: str | None, output: dict) -> None:
    """ComfyUI's ``executed`` event for a node that finished after its prompt did: the page shows its files."""
    instance = prompt_server()
    if instance is None or node is None:
        return
    instance.send_sync("executed", {"node": node, "display_node": node, "output": output, "prompt_id": prompt_id},
                       client_id)


__all__ = ["PromisedImages", "audio_output", "comfy_metadata", "send_executed"]
