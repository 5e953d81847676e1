"""ComfyUI's own VAE class on mesh-ray's decoder actors: ``ComfyVaeHost`` (a ``mesh_ray`` ``VaeHost``).

Made in the ComfyUI process from the VAE a node received (a ``comfy.sd.VAE``, whatever loaded it):
it records the ComfyUI this process runs (``ComfySource``), the metadata of the file the VAE came
from (the LTX VAEs read their config from it), a content hash of the VAE's tensors and the
signature of its model (class, tensor names, shapes and dtypes).  The tensors travel to each
decoder's node once through Ray's object store and are cached there by content hash
(``mesh_ray.actors.shards``); the host itself is small.

On the actor, ``load_weights`` activates the same ComfyUI and rebuilds the VAE with ComfyUI's own
constructor, ``comfy.sd.VAE(sd=..., metadata=..., dtype=...)`` (its detection, classes and ops, with
the ComfyUI process's precision flags, in the dtype the VAE has in the ComfyUI process unless the
pool's ``dtype`` option names another), and checks the rebuilt model's signature against the
original: a VAE ComfyUI cannot rebuild from its tensors is one ``ConfigError`` line, never another
model.  A decoder on the CPU uses the ComfyUI process's torch thread count (CPU kernels split their
sums by thread, so another count changes the last bits; the actor's ``torch_threads`` yields to it).  ``decode`` is ComfyUI's ``VAEDecode`` (or ``VAEDecodeTiled``, when tile sizes are given),
line for line (``comfy_decode``), under ``torch.inference_mode`` as ComfyUI's executor runs nodes.

ComfyUI is imported only inside functions here.  This class must stay importable as
``comfy_integration.vae_host`` (it is pickled to the actors by that name).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch

from mesh_ray.actors.device import DTYPES, dtype_name
from mesh_ray.digest import tensor_digest
from mesh_ray.errors import ConfigError
from mesh_ray.models.images import save_images
from mesh_ray.models.safetensors_io import load_tensors, write_atomic

from .comfy_env import ComfySource
from .video_files import VIDEO_SUFFIX, write_video

StateDict = dict[str, torch.Tensor]
TILED_OPTIONS = ("tile_size", "overlap", "temporal_size", "temporal_overlap")  # VAEDecodeTiled's inputs
OPTIONS = TILED_OPTIONS + ("fps",)  # fps: forget mode writes a video latent as a video at this rate


# -- what ComfyUI's VAEDecode / VAEDecodeTiled do (nodes.py, 0.20.1 and 0.3.64) ---------------------


def comfy_decode(vae: Any, latent: torch.Tensor, tiled: Mapping[str, int] | None = None) -> torch.Tensor:
    """``VAEDecode.decode`` (``tiled`` None) or ``VAEDecodeTiled.decode(tile_size, overlap, temporal_size,
    temporal_overlap)`` on a plain latent tensor: the same calls, arguments and batch combining."""
    if latent.is_nested:
        latent = latent.unbind()[0]
    if not tiled:
        images = vae.decode(latent)
    else:
        tile_size = int(tiled["tile_size"])
        overlap = int(tiled.get("overlap", 64))
        temporal_size = int(tiled.get("temporal_size", 64))
        temporal_overlap = int(tiled.get("temporal_overlap", 8))
        if tile_size < overlap * 4:
            overlap = tile_size // 4
        if temporal_size < temporal_overlap * 2:
            temporal_overlap = temporal_overlap // 2
        temporal_compression = vae.temporal_compression_decode()
        if temporal_compression is not None:
            temporal_size = max(2, temporal_size // temporal_compression)
            temporal_overlap = max(1, min(temporal_size // 2, temporal_overlap // temporal_compression))
        else:
            temporal_size = None
            temporal_overlap = None
        compression = vae.spacial_compression_decode()
        images = vae.decode_tiled(latent, tile_x=tile_size // compression, tile_y=tile_size // compression,
                                  overlap=overlap // compression, tile_t=temporal_size, overlap_t=temporal_overlap)
    if len(images.shape) == 5:  # combine batches
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return images


# -- facts about a ComfyUI VAE, read in the ComfyUI process ------------------------------------------


def model_signature(vae: Any) -> str:
    """Class of the VAE's model plus its tensor names, shapes and dtypes, hashed: what a rebuild must match."""
    model = vae.first_stage_model
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(json.dumps([k, list(v.shape), str(v.dtype)]).encode())
    return h.hexdigest()


_facts: "weakref.WeakKeyDictionary[Any, tuple[str, str]]" = weakref.WeakKeyDictionary()


def vae_facts(vae: Any) -> tuple[str, str]:
    """(content hash of the VAE's tensors, model signature), computed once per VAE object."""
    if vae not in _facts:
        sd = vae.get_sd()
        _facts[vae] = (tensor_digest((k, sd[k]) for k in sorted(sd)), model_signature(vae))
    return _facts[vae]


def latent_form(vae: Any) -> str:
    """The latent layout a VAE decodes, as a message shows it."""
    c = vae.latent_channels
    if vae.latent_dim == 3:
        return f"[B, {c}, F, h, w]"
    if vae.latent_dim == 1:
        return f"[B, {c}, t]"
    return f"[B, {c}, h, w]"


def file_metadata(vae: Any, metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    """The metadata ComfyUI built the VAE with: the file's (when the node could find the file), else
    the config a model keeps of it (LTX's video VAE: ``{"config": {"vae": ...}}``), else None."""
    if metadata:
        return {str(k): str(v) for k, v in metadata.items()}
    config = getattr(vae.first_stage_model, "config", None)
    if isinstance(config, dict):
        return {"config": json.dumps({"vae": config})}
    return None


class ComfyVaeHost:
    """ComfyUI's VAE class as a mesh-ray decoder actor hosts it (see the module docstring).

    Made in the ComfyUI process: ``ComfyVaeHost(vae, name, metadata)``; ``name`` labels it in
    messages (the file name when known), ``metadata`` is the file's safetensors metadata.
    """

    reads_file = False  # the tensors always come through the object store (cached per node)

    def __init__(self, vae: Any, name: str | None = None, metadata: Mapping[str, str] | None = None):
        if getattr(vae, "first_stage_model", None) is None or not hasattr(vae, "get_sd"):
            raise ConfigError(f"the VAE input is not a usable ComfyUI VAE ({type(vae).__name__} without a model): "
                              f"load one with Load VAE (or a checkpoint loader that has a VAE)")
        model = vae.first_stage_model
        self.source = ComfySource.here().for_actors()
        self.model_class = type(model).__qualname__
        self.label = f"ComfyUI VAE {name or self.model_class}"
        self.metadata = file_metadata(vae, metadata)
        self.digest, self.signature = vae_facts(vae)
        self.latent_channels = int(vae.latent_channels)
        self.latent_dim = int(vae.latent_dim)
        self.form = latent_form(vae)
        # CPU kernels split their sums by thread: the same count as this process gives the same bits
        self.cpu_threads = torch.get_num_threads()
        self.dtype = dtype_name(vae.vae_dtype)  # what the VAE computes in here (ComfyUI's rule and flags)
        self._vae = weakref.ref(vae)  # the ComfyUI process's VAE (not pickled): its tensors are the ones shipped
        self.vae: Any = None  # the rebuilt VAE, on the actor

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_vae": None, "vae": None}

    def follow(self, vae: Any) -> None:
        """Ship ``vae``'s tensors from now on (an equal VAE: same content hash; ComfyUI may have loaded it again)."""
        if vae_facts(vae) != (self.digest, self.signature):
            raise ConfigError(f"{self.label} cannot follow another VAE: make a new host for it")
        self._vae = weakref.ref(vae)

    # -- shapes and options (driver and actor) ------------------------------------------------------

    def check(self, shape: tuple[int, ...], options: Mapping[str, Any]) -> None:
        shape = tuple(int(s) for s in shape)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"decode options {unknown} are not known to {self.label}: use {', '.join(OPTIONS)}")
        ranks = {3: (5,), 2: (4, 5), 1: (3,)}.get(self.latent_dim, (self.latent_dim + 2,))
        if len(shape) not in ranks or shape[1] != self.latent_channels or min(shape) < 1:
            raise ConfigError(f"latent of shape {list(shape)} does not fit {self.label}, which decodes {self.form}: "
                              f"connect the VAE that matches the model that made the latent")
        bad = {k: v for k, v in options.items() if k in TILED_OPTIONS and (not isinstance(v, int) or v < 0)}
        if bad or ("tile_size" not in options and any(k in options for k in TILED_OPTIONS)):
            raise ConfigError(f"tiled decode options {dict(options)} need tile_size and whole numbers >= 0, as "
                              f"VAE Decode (Tiled) takes them: e.g. tile_size=512, overlap=64")
        if "fps" in options and not (isinstance(options["fps"], (int, float)) and options["fps"] > 0):
            raise ConfigError(f"fps {options['fps']!r} must be a number above 0: use the video's frame rate")

    # -- weights ----------------------------------------------------------------------------------

    def can_read_file(self) -> bool:
        return False

    def load_file(self, dtype: str) -> None:
        raise ConfigError(f"{self.label} is not loaded from a file: its tensors are shipped (ship='auto')")

    def weights(self) -> StateDict:
        """The ComfyUI process's VAE tensors, on the CPU (the ones its own decode uses)."""
        vae = self._vae() if self._vae is not None else None
        if vae is None:
            raise ConfigError(f"{self.label} is no longer loaded in this ComfyUI process, so a new decoder cannot get "
                              f"its weights: queue the prompt again")
        return {k: v.detach().to("cpu") for k, v in vae.get_sd().items()}

    def load_weights(self, sd: StateDict, dtype: str) -> None:
        self.source.activate()
        import comfy.sd

        try:
            vae = comfy.sd.VAE(sd=sd, dtype=DTYPES[self.dtype if dtype in (None, "auto") else dtype],
                               metadata=self.metadata)
            vae.throw_exception_if_invalid()
        except Exception as e:  # ComfyUI's own messages span lines: the first says what failed
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(f"ComfyUI cannot rebuild {self.label} on a decoder from its tensors ({type(e).__name__}: "
                              f"{first}): load it with Load VAE (or its model's own VAE loader) so the file's "
                              f"metadata can travel, or decode it with ComfyUI's VAE Decode") from None
        if model_signature(vae) != self.signature:
            raise ConfigError(f"{self.label} is not supported on decoders: ComfyUI rebuilt it from its tensors as "
                              f"another model ({type(vae.first_stage_model).__qualname__}); decode it with ComfyUI's "
                              f"VAE Decode")
        if vae.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        self.vae = vae

    def read_cached(self, path: Path) -> StateDict:
        return load_tensors(path, lambda k: k)

    def write_cached(self, sd: StateDict, path: Path) -> None:
        write_atomic(sd, path)

    def loaded(self) -> bool:
        return self.vae is not None

    def describe(self) -> dict:
        vae = self.vae
        return {"kind": "comfyui", "arch": self.model_class, "comfyui": self.source.describe(),
                "device": str(vae.device) if vae is not None else None,
                "dtype": dtype_name(vae.vae_dtype) if vae is not None else None, "torch_threads": torch.get_num_threads()}

    # -- work (on the actor) -----------------------------------------------------------------------

    def decode(self, latent: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
        tiled = {k: options[k] for k in TILED_OPTIONS if k in options}
        with torch.inference_mode():
            return comfy_decode(self.vae, latent, tiled or None).cpu()

    def save(self, output: torch.Tensor, folder: Path, stem: str, metadata: Mapping[str, Any] | None,
             options: Mapping[str, Any]) -> list[Path]:
        """Forget mode: a video latent (``fps`` given) as one video through ComfyUI's writer, else PNGs."""
        if options.get("fps"):
            return [write_video(output, folder / f"{stem}{VIDEO_SUFFIX}", float(options["fps"]), None, metadata)]
        return save_images(output, folder, metadata, stem=stem, as_dir=True)

    def release(self) -> None:
        self.vae = None


__all__ = ["ComfyVaeHost", "OPTIONS", "TILED_OPTIONS", "comfy_decode", "file_metadata", "latent_form",
           "model_signature", "vae_facts"]
