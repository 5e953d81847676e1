"""What a VAE decoder actor hosts: one decoder behind one small interface, whichever code provides it.

``VaeHost`` is that interface.  A host is made in the driver (it names the VAE and checks latents
there at once), pickled to each decoder actor, and loaded there: from a file the actor's node can
read, or from tensors shipped through the object store once and cached on the node by content
hash (``mesh_ray.actors.shards``).  The pool (``mesh_ray.vae.service``), the actor
(``mesh_ray.actors.vae``) and the promises are the same for every host.

Two hosts exist: ``FluxVaeHost`` here (mesh-ray's own FLUX.1/FLUX.2 decoder, ``models/vae.py``:
the library, the CLI and workflows) and ``comfy_integration.vae_host.ComfyVaeHost`` (ComfyUI's own
``comfy.sd.VAE``, for the ComfyUI nodes; it lives beside ComfyUI so ``mesh_ray`` never imports it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from mesh_ray.actors.device import dtype_name, pick_device
from mesh_ray.errors import ConfigError
from mesh_ray.models.images import save_images

StateDict = dict[str, torch.Tensor]


@runtime_checkable
class VaeHost(Protocol):
    """One VAE decoder as a decoder actor runs it (a picklable record until ``load*`` runs).

    ``label`` names the VAE in messages; ``reads_file`` says whether ``load_file`` can work at all
    (False: the weights always come through the object store).  ``options`` are the host's own
    decode options (mesh-ray: tile, overlap, raw; ComfyUI: VAEDecodeTiled's tile sizes, fps for
    forget-mode video); ``check`` refuses a bad latent or option in one line, in the driver before
    anything is sent and again in the actor.
    """

    label: str
    reads_file: bool

    def check(self, shape: tuple[int, ...], options: Mapping[str, Any]) -> None: ...

    def can_read_file(self) -> bool: ...

    def load_file(self, dtype: str) -> None: ...

    def weights(self) -> StateDict: ...

    def load_weights(self, sd: StateDict, dtype: str) -> None: ...

    def read_cached(self, path: Path) -> StateDict: ...

    def write_cached(self, sd: StateDict, path: Path) -> None: ...

    def loaded(self) -> bool: ...

    def describe(self) -> dict: ...

    def decode(self, latent: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor: ...

    def save(self, output: torch.Tensor, folder: Path, stem: str, metadata: Mapping[str, Any] | None,
             options: Mapping[str, Any]) -> list[Path]: ...

    def release(self) -> None: ...


FLUX_OPTIONS = ("tile", "overlap", "raw")


class FluxVaeHost:
    """mesh-ray's own FLUX.1 / FLUX.2 VAE decoder (``mesh_ray.models.vae``) read from a safetensors file.

    The driver reads only the header (``inspect_vae``); each actor reads the decoder tensors from
    the same path when its node has the file, or gets them shipped.  Options: ``tile`` (pixels or
    None), ``overlap`` (pixels, 64), ``raw`` (the latent is already in the VAE's own space).
    """

    reads_file = True

    def __init__(self, checkpoint: str | os.PathLike):
        from mesh_ray.models.vae import inspect_vae

        self.checkpoint = str(Path(checkpoint).resolve())
        self.info = inspect_vae(self.checkpoint)
        self.config = self.info.config
        self.label = f"{self.config.arch} VAE {self.checkpoint}"
        self.model: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None}  # the actor loads its own copy

    def check(self, shape: tuple[int, ...], options: Mapping[str, Any]) -> None:
        from mesh_ray.models.vae import check_tiling

        unknown = sorted(set(options) - set(FLUX_OPTIONS))
        if unknown:
            raise ConfigError(f"decode options {unknown} are not known to the FLUX VAE: use {', '.join(FLUX_OPTIONS)}")
        self.config.check_latent(shape)
        check_tiling(self.config, options.get("tile"), options.get("overlap", 64))

    def can_read_file(self) -> bool:
        return os.path.isfile(self.checkpoint) and os.access(self.checkpoint, os.R_OK)

    def load_file(self, dtype: str) -> None:
        from mesh_ray.models.vae import load_vae

        device, torch_dtype = pick_device(dtype)
        self.model = load_vae(self.checkpoint, device=device, dtype=torch_dtype, info=self.info)

    def weights(self) -> StateDict:
        from mesh_ray.models.vae import load_vae_state

        return load_vae_state(self.checkpoint, self.info)

    def load_weights(self, sd: StateDict, dtype: str) -> None:
        from mesh_ray.models.vae import vae_from_state

        device, torch_dtype = pick_device(dtype)
        self.model = vae_from_state(sd, self.config, device, torch_dtype, where=f"shipped {self.checkpoint}")

    def read_cached(self, path: Path) -> StateDict:
        from mesh_ray.models.vae import load_vae_state

        return load_vae_state(path)

    def write_cached(self, sd: StateDict, path: Path) -> None:
        from mesh_ray.models.vae import save_vae_state

        save_vae_state(sd, path, self.config)

    def loaded(self) -> bool:
        return self.model is not None

    def describe(self) -> dict:
        m = self.model
        return {"kind": "mesh-ray", "arch": self.config.arch, "device": str(m.device) if m is not None else None,
                "dtype": dtype_name(m.dtype) if m is not None else None}

    def decode(self, latent: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
        return self.model.decode(latent, tile=options.get("tile"), overlap=options.get("overlap", 64),
                                 raw=bool(options.get("raw", False))).cpu()

    def save(self, output: torch.Tensor, folder: Path, stem: str, metadata: Mapping[str, Any] | None,
             options: Mapping[str, Any]) -> list[Path]:
        return save_images(output, folder, metadata, stem=stem, as_dir=True)

    def release(self) -> None:
        self.model = None


def flux_options(tile: int | None, overlap: int, raw: bool) -> dict:
    """The FLUX host's options from ``VaeService.decode``'s keywords (only those that differ from the default)."""
    out: dict[str, Any] = {}
    if tile is not None:
        out["tile"] = tile
    if overlap != 64:
        out["overlap"] = overlap
    if raw:
        out["raw"] = True
    return out


__all__ = ["FLUX_OPTIONS", "FluxVaeHost", "StateDict", "VaeHost", "flux_options"]
