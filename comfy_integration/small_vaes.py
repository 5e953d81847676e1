"""Small VAEs built through ComfyUI's own classes with seeded random weights, for tests and ``mesh-ray bench
comfy-vae`` (no weights can be downloaded here).

* FLUX.1 / FLUX.2: ComfyUI 0.20's detection (``comfy.sd.VAE``) fixes the encoder at the released widths
  but reads the decoder's width from ``decoder.conv_in``, so ``flux_vae(arch, ch=32)`` is a narrow
  decoder (widths 32..128, 8x / 16x like the real ones) beside a full-size encoder left at zeros
  (0.3.64 fixes the decoder too: there it is the released size).
* LTX 2.3 video: ComfyUI reads the LTX VAE's config from the file's metadata
  (``{"config": {"vae": {...}}}``), so ``LTX_VIDEO_VAE`` is a real LTX-2-style causal video decoder
  (patch 4, three 2x2x2 depth-to-space steps: 32x in space, 8x in time, 128 latent channels) with 8
  base channels; ``write_ltx_video_vae`` writes it as a safetensors file that ``VAELoader`` loads.
* LTX 2.3 audio: ``LTX_AUDIO_VAE`` (a narrow mel decoder and HiFi-GAN vocoder, 16 kHz, latents
  ``[B, 8, T, 16]``), written in the checkpoint layout that ``LTXVAudioVAELoader`` reads.

Weights: seeded normal, scaled by 1/sqrt(fan-in) (norm scales 1, biases small, latent statistics
mean 0 / std 1), so the outputs are neither flat nor all clipped.  ComfyUI is imported lazily.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mesh_ray.models.safetensors_io import write_atomic

LTX_VIDEO_VAE: dict = {
    "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all_res", {"multiplier": 2}],
                       ["compress_all_res", {"multiplier": 2}], ["compress_all_res", {"multiplier": 1}]],
    "decoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {"residual": True, "multiplier": 2}],
                       ["compress_all", {"residual": True, "multiplier": 2}],
                       ["compress_all", {"residual": True, "multiplier": 2}], ["res_x", {"num_layers": 1}]],
    "encoder_base_channels": 8, "decoder_base_channels": 8, "scaling_factor": 1.0, "norm_layer": "pixel_norm",
    "patch_size": 4, "latent_log_var": "uniform", "use_quant_conv": False, "causal_decoder": False,
    "timestep_conditioning": False, "spatial_padding_mode": "reflect",
}
LTX_AUDIO_VAE: dict = {
    "audio_vae": {"model": {"params": {"ddconfig": {
        "double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "downsample_time": False,
        "in_channels": 2, "out_ch": 2, "ch": 8, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel", "causality_axis": "height"},
        "sampling_rate": 16000}}, "preprocessing": {"stft": {"filter_length": 1024, "hop_length": 160}}},
    "vocoder": {"resblock_kernel_sizes": [3], "upsample_rates": [5, 4, 2, 2, 2], "upsample_kernel_sizes": [16, 16, 8, 4, 4],
                "resblock_dilation_sizes": [[1, 3, 5]], "upsample_initial_channel": 32, "stereo": True, "resblock": "1",
                "activation": "snake"},
}


def random_like(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random tensors with the names and shapes of ``state`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sorted(state.items()):
        if not v.is_floating_point():
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif "mean-of-means" in k or k.endswith("running_mean"):
            out[k] = torch.randn(v.shape, generator=g) * 0.1 if k.endswith("running_mean") else torch.zeros(v.shape)
        elif "std-of-means" in k or k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g) if k.endswith("running_var") else torch.ones(v.shape)
        elif v.ndim >= 2:
            out[k] = torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5
        elif "norm" in k or k.endswith((".alpha", ".beta", "scale_multiplier")):
            out[k] = torch.ones(v.shape)
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.02
    return out


def flux_vae(arch: str = "flux1", seed: int = 0, ch: int = 32, dtype: torch.dtype | None = None) -> Any:
    """A ComfyUI VAE (``comfy.sd.VAE``) of FLUX.1 (16 latent channels, 8x) or FLUX.2 (128 latent channels,
    16x) with a ``ch``-wide decoder, found by ComfyUI's own detection; the encoder's tensors are zeros.
    A ComfyUI that fixes the decoder's width too (0.3.64) gets the released width, 128."""
    import comfy.sd

    z = {"flux1": 16, "flux2": 32}[arch]

    def shapes_for(width: int) -> dict:
        probe = {"decoder.conv_in.weight": torch.zeros(width * 4, z, 3, 3),
                 "decoder.up.3.upsample.conv.weight": torch.zeros(width * 4, width * 4, 3, 3)}
        if arch == "flux2":
            probe |= {"decoder.post_quant_conv.weight": torch.zeros(z, z, 1, 1),
                      "bn.running_mean": torch.zeros(z * 4), "bn.running_var": torch.ones(z * 4)}
        logging.disable(logging.WARNING)  # the probe lacks every other tensor: ComfyUI would list them all
        try:
            return comfy.sd.VAE(sd=probe, dtype=dtype).first_stage_model.state_dict()  # ComfyUI's model for it
        finally:
            logging.disable(logging.NOTSET)

    try:
        shapes = shapes_for(ch)
    except RuntimeError:  # "size mismatch": this ComfyUI builds the released decoder whatever the file says
        shapes = shapes_for(128)
    sd = random_like({k: v for k, v in shapes.items() if not k.startswith("encoder.")}, seed)
    sd |= {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items() if k.startswith("encoder.")}
    vae = comfy.sd.VAE(sd=sd, dtype=dtype)
    vae.throw_exception_if_invalid()
    return vae


def ltx_video_state(seed: int = 0, config: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a small LTX video VAE through ComfyUI's ``VideoVAE`` class."""
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    config = dict(config or LTX_VIDEO_VAE)
    with torch.device("meta"):
        shapes = VideoVAE(config=config).state_dict()
    return random_like(shapes, seed), {"config": json.dumps({"vae": config})}


def write_ltx_video_vae(path: str | os.PathLike, seed: int = 0, config: dict | None = None) -> Path:
    """A small LTX video VAE as a safetensors file with the metadata ComfyUI's detection reads (``VAELoader``)."""
    sd, meta = ltx_video_state(seed, config)
    return write_atomic(sd, path, meta)


def write_ltx_audio_vae(path: str | os.PathLike, seed: int = 0, config: dict | None = None) -> Path:
    """A small LTX audio VAE + vocoder in the LTX checkpoint layout (``audio_vae.*``, ``vocoder.*``, config in
    the metadata), as ``LTXVAudioVAELoader`` reads it from the checkpoints folder."""
    from comfy.ldm.lightricks.vae.audio_vae import AudioVAE

    meta = {"config": json.dumps(config or LTX_AUDIO_VAE)}
    with torch.device("meta"):
        shapes = AudioVAE(metadata=meta).state_dict()
    sd = random_like(shapes, seed)
    return write_atomic({("audio_vae." + k[len("autoencoder."):] if k.startswith("autoencoder.") else k): v
                         for k, v in sd.items()}, path, meta)


__all__ = ["LTX_AUDIO_VAE", "LTX_VIDEO_VAE", "flux_vae", "ltx_video_state", "random_like", "write_ltx_audio_vae",
           "write_ltx_video_vae"]
