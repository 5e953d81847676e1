"""MeshVAEDecode and MeshSavePromisedImage: VAE decode on mesh-ray's decoder actors, saved when ready.

``MeshVAEDecode`` hands a LATENT to a pool of decoder actors (``mesh_ray.VaeService``, one pool
per VAE file and settings, reused across queues) in one of three modes:

* ``wait``: returns the decoded IMAGE (and a PROMISE that is already kept);
* ``promise``: returns at once with a PROMISE; IMAGE is a preview of the latent at image size;
* ``forget``: the decoder writes the PNGs itself into ComfyUI's output folder (on the decoder's
  node: the node's text output says which node and folder); IMAGE is the latent preview.

``MeshSavePromisedImage`` returns at once and writes the PNG (with ComfyUI's prompt/workflow
metadata) from a background thread when the decode finishes, then sends ComfyUI's ``executed``
event so the page shows it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from .connection import live_mesh
from .registry import prompt_server
from .node_spec import mesh_node
from mesh_ray.errors import ConfigError, MeshError
from mesh_ray.models.images import latent_to_rgb
from mesh_ray.vae.promise import Promise, SaveHandle
from mesh_ray.vae.service import MODES, VaeService

log = logging.getLogger("mesh_ray.comfy")

MODE_CHOICES = ["promise", "wait", "forget"]
assert set(MODE_CHOICES) == set(MODES)


@dataclass
class PromisedImages:
    """The PROMISE value: a decode still running, with what the saver needs to name its files."""

    promise: Promise
    width: int
    height: int
    batch: int


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
                          f"ae.safetensors there or pick another vae_name")
    return path


def _service(mesh: Any, path: str, replicas: int, idle_timeout_s: float, output_dir: str) -> VaeService:
    """The pool for these settings, made once; a pool of the same file with other settings is
    closed (after its work finishes) when this one replaces it."""
    key = (id(mesh), path, os.path.getmtime(path), replicas, idle_timeout_s, output_dir)
    with _lock:
        svc = _services.get(key)
        if svc is not None and not svc.closed:
            return svc
        for k in [k for k in _services if k[1] == path]:
            old = _services.pop(k)
            threading.Thread(target=old.close, name="mesh-ray-vae-close", daemon=True).start()
        svc = mesh.vae(path, replicas=replicas, idle_timeout_s=idle_timeout_s or None, output_dir=output_dir)
        _services[key] = svc
        return svc


def _metadata(prompt: Any, extra_pnginfo: Any) -> dict | None:
    """ComfyUI's PNG text chunks: ``prompt`` and each ``extra_pnginfo`` entry (the workflow), as SaveImage writes them."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return None
    meta: dict = {}
    if prompt is not None:
        meta["prompt"] = prompt
    meta.update(extra_pnginfo or {})
    return meta


def _preview(latent: torch.Tensor, scale: int) -> torch.Tensor:
    """IMAGE ``[B, H, W, 3]`` at the decoded size showing the latent (while the real one is decoding)."""
    return torch.from_numpy(np.stack([latent_to_rgb(x, scale) for x in latent.float().cpu()])).float() / 255.0


def _where(svc: VaeService, folder: str) -> str:
    """'folder on this machine' or 'folder on node 10.0.0.7' for the nodes the replicas run on."""
    here = ray.get_runtime_context().get_node_id()
    ips = {n["NodeID"]: n.get("NodeManagerAddress", n["NodeID"]) for n in ray.nodes()}
    nodes = {i.get("node") for i in svc.replica_info(timeout=10) if "node" in i}
    others = sorted(ips.get(n, str(n)) for n in nodes if n != here)
    if not others:
        return f"{folder} on this machine"
    return f"{folder} on the decoder's node {', '.join(others)} (not this machine)"


@mesh_node("decode", "VAE decode on mesh-ray decoder actors (another GPU or machine) with wait, forget or promise.",
           [("IMAGE", "image", "wait: the decoded images; promise/forget: a preview of the latent at image size."),
            ("PROMISE", "promise", "The pending decode, for Mesh Save Promised Image (none in forget mode).")])
class MeshVAEDecode:
    """Decode a FLUX latent on mesh-ray decoder actors: wait, forget or promise."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The FLUX latent to decode (from a KSampler)."}),
                "mesh": ("MESH", {"tooltip": "The Ray connection from MeshConnect; decoders run on its cluster."}),
                "vae_name": (folder_paths.get_filename_list("vae"), {
                    "tooltip": "FLUX VAE file (ae.safetensors) in ComfyUI's vae folder. A decoder on a node "
                               "that cannot read it gets its weights shipped once (cached there by content hash)."}),
                "mode": (MODE_CHOICES, {"default": "promise", "tooltip":
                         "promise: return at once, save later with Mesh Save Promised Image; wait: return the "
                         "decoded image; forget: the decoder saves the PNG into ComfyUI's output folder itself."}),
                "replicas": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                             "Number of decoder actors (each takes a GPU when the cluster has GPUs)."}),
                "idle_timeout_s": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 86400.0, "step": 1.0, "tooltip":
                                   "A decoder idle this long exits and frees its GPU; the next decode starts it "
                                   "again. 0 keeps it running."}),
            },
            "optional": {
                "filename_prefix": ("STRING", {"default": "mesh_ray", "tooltip":
                                    "forget mode: file name prefix inside ComfyUI's output folder."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name: str) -> bool | str:
        try:
            vae_path(vae_name)
        except MeshError as e:
            return str(e)
        return True

    def decode(self, samples: dict, mesh: Any, vae_name: str, mode: str, replicas: int, idle_timeout_s: float,
               filename_prefix: str = "mesh_ray", prompt: Any = None, extra_pnginfo: Any = None) -> dict:
        import folder_paths

        path = vae_path(vae_name)
        latent = samples["samples"]
        output_dir = folder_paths.get_output_directory()
        mesh = live_mesh(mesh)  # a cached connection from before the cluster restarted: its replacement
        svc = _service(mesh, path, int(replicas), float(idle_timeout_s), output_dir)
        b, _, h, w = latent.shape
        scale = svc.config.pixel_scale(latent.shape[1])
        # ComfyUI's LATENT is already in the decoder's space (the model's process_latent_out ran).
        if mode == "wait":
            images = svc.decode(latent, mode="wait", raw=True)
            promise = Promise(ray.put(images.numpy()), label="VAE decode (wait mode, done)")
            return {"result": (images, PromisedImages(promise, images.shape[2], images.shape[1], b))}
        if mode == "promise":
            promise = svc.decode(latent, mode="promise", raw=True)
            return {"result": (_preview(latent, scale), PromisedImages(promise, w * scale, h * scale, b))}
        if mode == "forget":
            request = svc.decode(latent, mode="forget", save=filename_prefix, raw=True,
                                 metadata=_metadata(prompt, extra_pnginfo))
            note = (f"forget: the decoder writes {filename_prefix}_{request}_NN.png into "
                    f"{_where(svc, output_dir)}")
            log.info("%s", note)
            return {"ui": {"text": [note]}, "result": (_preview(latent, scale), None)}
        raise ConfigError(f"unknown mode {mode!r}: use one of {', '.join(MODE_CHOICES)}")


# -- saving ---------------------------------------------------------------------------------------

_reserved: dict[tuple[str, str], int] = {}  # (folder, name) -> last counter handed out, not yet written


def _target(prefix: str, output_dir: str, p: PromisedImages) -> tuple[str, str]:
    """(file path, subfolder) named as SaveImage names files; counters reserved until written."""
    import folder_paths

    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir, p.width, p.height)
    name = name.replace("%batch_num%", "0")
    with _lock:
        counter = max(counter, _reserved.get((folder, name), 0) + 1)
        _reserved[(folder, name)] = counter + p.batch - 1
    return os.path.join(folder, f"{name}_{counter:05}_.png"), subfolder


def _send_executed(node: str | None, prompt_id: str | None, client_id: str | None, output: dict) -> None:
    """ComfyUI's ``executed`` event for a node that finished after its prompt did: the page shows the images."""
    instance = prompt_server()
    if instance is None or node is None:
        return
    instance.send_sync("executed", {"node": node, "display_node": node, "output": output, "prompt_id": prompt_id},
                       client_id)


@mesh_node("save", "Writes the PNG (with the workflow metadata) when the decode finishes, without holding up the "
           "queue; the image appears on this node once written.", output_node=True)
class MeshSavePromisedImage:
    """Save a promised decode as PNG when it is ready; returns at once."""

    INPUTS = {
        "required": {
            "promise": ("PROMISE", {"tooltip": "The pending decode from Mesh VAE Decode (promise or wait mode)."}),
            "filename_prefix": ("STRING", {"default": "mesh_ray", "tooltip":
                                "File name prefix inside ComfyUI's output folder (sub-folders and %date% "
                                "style variables as in Save Image)."}),
        },
        "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
    }

    def save(self, promise: PromisedImages | None, filename_prefix: str = "mesh_ray", prompt: Any = None,
             extra_pnginfo: Any = None, unique_id: str | None = None) -> dict:
        import folder_paths

        if promise is None:
            raise ConfigError("Mesh Save Promised Image got no promise: Mesh VAE Decode in forget mode saves by "
                              "itself; use mode promise or wait to save here")
        instance = prompt_server()
        client_id = getattr(instance, "client_id", None)
        prompt_id = getattr(instance, "last_prompt_id", None)
        path, subfolder = _target(filename_prefix, folder_paths.get_output_directory(), promise)
        handle = promise.promise.save(path, _metadata(prompt, extra_pnginfo))

        def done(h: SaveHandle) -> None:
            try:
                written = h.result(0)
            except MeshError as e:
                log.error("Mesh Save Promised Image (node %s): %s", unique_id, e)
                return
            log.info("Mesh Save Promised Image wrote %s", ", ".join(str(p) for p in written))
            images = [{"filename": os.path.basename(p), "subfolder": subfolder, "type": "output"} for p in written]
            _send_executed(unique_id, prompt_id, client_id, {"images": images})

        handle.add_done_callback(done)
        self.last_handle = handle  # for callers in Python (tests, scripts) that want to wait on it
        return {"ui": {"text": [f"writing {os.path.basename(path)} when the decode finishes"]}}


NODE_CLASS_MAPPINGS = {"MeshVAEDecode": MeshVAEDecode, "MeshSavePromisedImage": MeshSavePromisedImage}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshVAEDecode": "Mesh VAE Decode", "MeshSavePromisedImage": "Mesh Save Promised Image"}
