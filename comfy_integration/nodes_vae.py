"""MeshVAEDecode: VAE decode on mesh-ray's decoder actors (another GPU or machine), wait / forget / promise.

Two kinds of decoder behind one pool (``mesh_ray.VaeService``, one per VAE and settings, reused
across queues), one actor, one promise type:

* the ``vae`` input connected (any VAE ComfyUI loads: FLUX.1, FLUX.2, the LTX video VAE, ...):
  ComfyUI's own VAE class runs on the decoders (``vae_host.ComfyVaeHost``) and the result is what
  ComfyUI's ``VAE Decode`` gives (``VAE Decode (Tiled)`` with ``tile_size`` > 0).  A LATENT that
  holds video and audio (LTX 2.3) has its video part decoded by ``vae`` and its audio part by
  ``audio_vae`` (what ``LTXV Audio VAE Decode`` gives), on their own decoder pools;
* otherwise ``vae_name``: mesh-ray's own FLUX VAE decoder reads that file (``models/vae.py``).

Modes:
* ``wait``: returns the decoded IMAGE (video frames flattened, as VAE Decode does), the AUDIO and a
  PROMISE that is already kept;
* ``promise``: returns at once with a PROMISE (for Mesh Save Promised Image / Video); IMAGE is a
  preview of the latent at the decoded size (one image per latent frame for a video); AUDIO is None;
* ``forget``: the decoder writes the files itself into ComfyUI's output folder on its node (PNGs,
  or one MP4 for a video latent); IMAGE is the preview.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np
import ray
import torch

from mesh_ray.errors import ConfigError, MeshError
from mesh_ray.models.images import latent_to_rgb
from mesh_ray.models.safetensors_io import read_header
from mesh_ray.vae.promise import Promise
from mesh_ray.vae.service import MODES, VaeService

from .connection import live_mesh
from .node_spec import mesh_node
from .promised import PromisedImages, audio_output, comfy_metadata
from .vae_host import ComfyVaeHost

log = logging.getLogger("mesh_ray.comfy")

MODE_CHOICES = ["promise", "wait", "forget"]
assert set(MODE_CHOICES) == set(MODES)
VAE_INPUT = "(the vae input)"  # vae_name when the VAE comes from the vae input
VAE_FOLDERS = ("vae", "checkpoints", "vae_approx")  # where a loader upstream may have read the VAE's file
TILED_DEFAULTS = {"overlap": 64, "temporal_size": 64, "temporal_overlap": 8}  # VAE Decode (Tiled)'s defaults


# -- the decoder pools ---------------------------------------------------------------------------

_lock = threading.Lock()
_services: dict[tuple, VaeService] = {}


def vae_path(vae_name: str) -> str:
    """Full path of ``vae_name`` in ComfyUI's ``vae`` folder(s); one-line error when it is not there."""
    import folder_paths

    path = folder_paths.get_full_path("vae", vae_name) if vae_name else None
    if not path or not os.path.isfile(path):
        where = ", ".join(folder_paths.get_folder_paths("vae")) or "models/vae"
        raise ConfigError(f"VAE file {vae_name!r} is not in ComfyUI's vae folder ({where}): put the FLUX "
                          f"ae.safetensors there or pick another vae_name (or connect a VAE to the vae input)")
    return path


def _service(mesh: Any, what: tuple, source: Any, replicas: int, idle_timeout_s: float, output_dir: str) -> VaeService:
    """The pool for ``what`` (a VAE file or a ComfyUI VAE's content) and these settings, made once; a
    pool of the same VAE with other settings is closed (after its work finishes) when this one replaces it."""
    key = (id(mesh), what, replicas, idle_timeout_s, output_dir)
    with _lock:
        svc = _services.get(key)
        if svc is not None and not svc.closed:
            return svc
        for k in [k for k in _services if k[1] == what]:
            old = _services.pop(k)
            threading.Thread(target=old.close, name="mesh-ray-vae-close", daemon=True).start()
        # Shipped weights are cached where this ComfyUI's MESH_RAY_CACHE_DIR says, else each node's default.
        svc = mesh.vae(source, replicas=replicas, idle_timeout_s=idle_timeout_s or None, output_dir=output_dir,
                       cache_dir=os.environ.get("MESH_RAY_CACHE_DIR"))
        _services[key] = svc
        return svc


def _file_pool(mesh: Any, vae_name: str, replicas: int, idle_timeout_s: float, output_dir: str) -> VaeService:
    path = vae_path(vae_name)
    return _service(mesh, ("file", path, os.path.getmtime(path)), path, replicas, idle_timeout_s, output_dir)


def traced_file(prompt: Any, unique_id: Any, input_name: str) -> tuple[str | None, dict | None]:
    """(file name, safetensors metadata) of the file that the node feeding ``input_name`` loaded, when the
    prompt shows one (Load VAE's vae_name, LTXV Audio VAE Loader's ckpt_name, a checkpoint loader...)."""
    import folder_paths

    node = (prompt or {}).get(str(unique_id)) if unique_id is not None else None
    link = (node or {}).get("inputs", {}).get(input_name)
    if not (isinstance(link, list) and len(link) == 2):
        return None, None
    source = (prompt or {}).get(str(link[0])) or {}
    for value in source.get("inputs", {}).values():
        if not isinstance(value, str) or not value.endswith((".safetensors", ".sft")):
            continue
        for folder in VAE_FOLDERS:
            path = folder_paths.get_full_path(folder, value)
            if path and os.path.isfile(path):
                return value, read_header(path)[1]
    return None, None


def _comfy_pool(mesh: Any, vae: Any, name: str | None, metadata: dict | None, replicas: int, idle_timeout_s: float,
                output_dir: str) -> VaeService:
    host = ComfyVaeHost(vae, name, metadata)
    svc = _service(mesh, ("comfy", host.digest, host.signature), host, replicas, idle_timeout_s, output_dir)
    svc.host.follow(vae)  # a reused pool ships this (equal) VAE's tensors to decoders it starts later
    return svc


# -- what the node returns while a decode runs ------------------------------------------------------


def _preview(latent: torch.Tensor, scale: int) -> torch.Tensor:
    """IMAGE ``[N, H, W, 3]`` at the decoded size showing the latent's first channels (while the real one
    is decoding): one image per latent, or per latent frame of a video latent ``[B, C, F, h, w]``."""
    x = latent.float().cpu()
    if x.ndim == 5:
        x = x.movedim(2, 1).reshape(-1, x.shape[1], x.shape[3], x.shape[4])
    return torch.from_numpy(np.stack([latent_to_rgb(f, scale) for f in x])).float() / 255.0


def decoded_size(vae: Any, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(width, height, images or frames, pixels per latent pixel) that ComfyUI's VAE decodes ``shape`` to."""
    scale = int(vae.spacial_compression_decode())
    ratio = vae.upscale_ratio[0] if isinstance(vae.upscale_ratio, tuple) else None
    frames = shape[0] * int(ratio(shape[2])) if len(shape) == 5 and callable(ratio) else shape[0]
    return shape[-1] * scale, shape[-2] * scale, frames, scale


def _where(svc: VaeService, folder: str) -> str:
    """'folder on this machine' or 'folder on node 10.0.0.7' for the nodes the replicas run on."""
    here = ray.get_runtime_context().get_node_id()
    ips = {n["NodeID"]: n.get("NodeManagerAddress", n["NodeID"]) for n in ray.nodes()}
    nodes = {i.get("node") for i in svc.replica_info(timeout=10) if "node" in i}
    others = sorted(ips.get(n, str(n)) for n in nodes if n != here)
    if not others:
        return f"{folder} on this machine"
    return f"{folder} on the decoder's node {', '.join(others)} (not this machine)"


def _split_latent(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(video or image part, audio part or None) of a LATENT (LTX 2.3: a NestedTensor (video, audio))."""
    if getattr(latent, "is_nested", False):
        parts = latent.unbind()
        return parts[0], (parts[1] if len(parts) > 1 else None)
    return latent, None


@mesh_node("decode", "VAE decode on mesh-ray decoder actors (another GPU or machine) with wait, forget or promise. "
           "With a VAE connected, ComfyUI's own VAE class runs on the decoders (any VAE ComfyUI loads; the result "
           "equals VAE Decode); video latents give frames, and an LTX audio part is decoded by audio_vae (video and "
           "audio VAEs verified on ComfyUI 0.20.1).",
           [("IMAGE", "image", "wait: the decoded images (video: all frames); promise/forget: a preview of the latent "
                               "at image size (video: one image per latent frame)."),
            ("PROMISE", "promise", "The pending decode, for Mesh Save Promised Image / Video (none in forget mode)."),
            ("AUDIO", "audio", "wait mode with an audio_vae: the decoded LTX audio; otherwise none.")])
class MeshVAEDecode:
    """Decode a latent on mesh-ray decoder actors: wait, forget or promise."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode (from a KSampler); an LTX 2.3 latent may "
                                                  "hold video and audio."}),
                "mesh": ("MESH", {"tooltip": "The Ray connection from MeshConnect; decoders run on its cluster."}),
                "vae_name": ([VAE_INPUT] + folder_paths.get_filename_list("vae"), {"default": VAE_INPUT, "tooltip":
                             f"{VAE_INPUT}: decode with the VAE connected to the vae input (ComfyUI's own VAE "
                             "class). A file: mesh-ray's own FLUX VAE decoder reads that ae.safetensors (ignored "
                             "when a VAE is connected)."}),
                "mode": (MODE_CHOICES, {"default": "promise", "tooltip":
                         "promise: return at once, save later with Mesh Save Promised Image / Video; wait: return "
                         "the decoded image; forget: the decoder saves the PNGs (a video latent: an MP4) into "
                         "ComfyUI's output folder itself."}),
                "replicas": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                             "Number of decoder actors (each takes a GPU when the cluster has GPUs)."}),
                "idle_timeout_s": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 86400.0, "step": 1.0, "tooltip":
                                   "A decoder idle this long exits and frees its GPU; the next decode starts it "
                                   "again. 0 keeps it running."}),
            },
            "optional": {
                "filename_prefix": ("STRING", {"default": "mesh_ray", "tooltip":
                                    "forget mode: file name prefix inside ComfyUI's output folder."}),
                "tile_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 32, "tooltip":
                              "0: decode as VAE Decode does. Above 0: as VAE Decode (Tiled) does with these tile "
                              "settings (vae input only)."}),
                "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32, "tooltip":
                            "Tiled decode: overlap in pixels (as VAE Decode (Tiled))."}),
                "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4, "tooltip":
                                  "Tiled decode of a video: frames per tile (as VAE Decode (Tiled))."}),
                "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4, "tooltip":
                                     "Tiled decode of a video: frames of overlap (as VAE Decode (Tiled))."}),
                "fps": ("FLOAT", {"default": 24.0, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip":
                        "forget mode, video latent: frame rate of the MP4 the decoder writes."}),
                "vae": ("VAE", {"tooltip": "The VAE (Load VAE, a checkpoint loader): ComfyUI's own VAE class runs "
                                           "on the decoders, so the result equals VAE Decode."}),
                "audio_vae": ("VAE", {"tooltip": "LTX 2.3: the audio VAE (LTXV Audio VAE Loader) that decodes the "
                                                 "latent's audio part."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name: str) -> bool | str:
        if vae_name == VAE_INPUT:
            return True
        try:
            vae_path(vae_name)
        except MeshError as e:
            return str(e)
        return True

    def decode(self, samples: dict, mesh: Any, vae_name: str, mode: str, replicas: int, idle_timeout_s: float,
               filename_prefix: str = "mesh_ray", tile_size: int = 0, overlap: int = 64, temporal_size: int = 64,
               temporal_overlap: int = 8, fps: float = 24.0, vae: Any = None, audio_vae: Any = None,
               prompt: Any = None, extra_pnginfo: Any = None, unique_id: str | None = None) -> dict:
        import folder_paths

        if mode not in MODE_CHOICES:
            raise ConfigError(f"unknown mode {mode!r}: use one of {', '.join(MODE_CHOICES)}")
        latent, audio_latent = _split_latent(samples["samples"])
        if vae is None and vae_name == VAE_INPUT:
            raise ConfigError("Mesh VAE Decode has no VAE: connect one to the vae input (Load VAE) or pick a FLUX "
                              "VAE file as vae_name")
        if audio_vae is not None and audio_latent is None:
            raise ConfigError(f"audio_vae is connected but the latent (shape {list(latent.shape)}) has no audio part: "
                              f"pass the LTX 2.3 audio+video latent, or disconnect audio_vae")
        if audio_vae is not None and mode == "forget":
            raise ConfigError("forget mode writes video without sound: use mode promise with Mesh Save Promised "
                              "Video to keep the LTX audio, or disconnect audio_vae")
        output_dir = folder_paths.get_output_directory()
        mesh = live_mesh(mesh)  # a cached connection from before the cluster restarted: its replacement
        args = (int(replicas), float(idle_timeout_s), output_dir)
        if vae is not None:
            name, meta = traced_file(prompt, unique_id, "vae")
            svc = _comfy_pool(mesh, vae, name, meta, *args)
            options = {"tile_size": int(tile_size), **{k: int(v) for k, v in zip(TILED_DEFAULTS, (
                overlap, temporal_size, temporal_overlap))}} if tile_size else {}
            width, height, count, scale = decoded_size(vae, tuple(latent.shape))
        else:
            if tile_size:
                raise ConfigError("tile_size works with a VAE on the vae input (ComfyUI's tiled decode): connect one, "
                                  "or set tile_size to 0")
            svc = _file_pool(mesh, vae_name, *args)
            options = {"raw": True}  # ComfyUI's LATENT is already in the decoder's space
            scale = svc.config.pixel_scale(latent.shape[1])
            width, height, count = latent.shape[-1] * scale, latent.shape[-2] * scale, latent.shape[0]
        video = latent.ndim == 5
        audio_svc = None
        if audio_vae is not None:
            name, meta = traced_file(prompt, unique_id, "audio_vae")
            audio_svc = _comfy_pool(mesh, audio_vae, name, meta, *args)
            rate = int(audio_vae.first_stage_model.output_sample_rate)
        if mode == "wait":
            images = svc.decode(latent, mode="wait", options=options)
            audio = audio_svc.decode(audio_latent, mode="wait") if audio_svc is not None else None
            kept = PromisedImages(Promise.kept(images, "VAE decode (wait mode, done)"), images.shape[2],
                                  images.shape[1], images.shape[0], video,
                                  Promise.kept(audio, "audio decode (wait mode, done)") if audio is not None else None,
                                  rate if audio is not None else None)
            return {"result": (images, kept, audio_output(audio, rate) if audio is not None else None)}
        if mode == "promise":
            promise = svc.decode(latent, mode="promise", options=options)
            audio = audio_svc.decode(audio_latent, mode="promise") if audio_svc is not None else None
            promised = PromisedImages(promise, width, height, count, video, audio, rate if audio is not None else None)
            return {"result": (_preview(latent, scale), promised, None)}
        if video:
            options = {**options, "fps": float(fps)}
        request = svc.decode(latent, mode="forget", save=filename_prefix, options=options,
                             metadata=comfy_metadata(prompt, extra_pnginfo))
        what = f"{filename_prefix}_{request}.mp4" if video else f"{filename_prefix}_{request}_NN.png"
        note = f"forget: the decoder writes {what} into {_where(svc, output_dir)}"
        log.info("%s", note)
        return {"ui": {"text": [note]}, "result": (_preview(latent, scale), None, None)}


NODE_CLASS_MAPPINGS = {"MeshVAEDecode": MeshVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshVAEDecode": "Mesh VAE Decode"}
