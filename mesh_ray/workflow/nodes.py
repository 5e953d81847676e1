"""Built-in node types: the mesh (split DiT, sampler, VAE decode, saving) and seeded random checkpoints
for the examples.  Synthetic helpers for tests and benchmarks live in ``testing_nodes`` (not imported here).

Paths given to nodes are resolved against the submitting client's working directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mesh_ray.errors import ConfigError
from mesh_ray.names import VAE_MODES
from mesh_ray.workflow.registry import node


def _path(base_dir: str, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


# -- checkpoints (seeded random weights: nothing is downloaded) ------------------------------------


def _write_once(base_dir: str, path: str, write: Any) -> str:
    """Write a file with ``write(path)`` unless it exists; reruns reuse it."""
    p = _path(base_dir, path)
    if not p.exists():
        write(p)
    return str(p)


@node("WriteRandomCheckpoint", outputs=("CHECKPOINT",))
def write_random_checkpoint_node(path: str, preset: str = "tiny-flux1", seed: int = 0, base_dir: str = ".") -> str:
    """Write a seeded random FLUX checkpoint (once; an existing file is reused) and return its path."""
    from mesh_ray.models.checkpoint import write_random_checkpoint

    return _write_once(base_dir, path, lambda p: write_random_checkpoint(p, preset, seed=seed))


@node("WriteRandomVAE", outputs=("VAE_CHECKPOINT",))
def write_random_vae_node(path: str, preset: str = "tiny-flux1", seed: int = 0, base_dir: str = ".") -> str:
    """Write a seeded random VAE decoder checkpoint (once) and return its path."""
    from mesh_ray.models.vae import write_random_vae

    return _write_once(base_dir, path, lambda p: write_random_vae(p, preset, seed=seed))


# -- the mesh ----------------------------------------------------------------------------------


@node("LoadSplitDiT", outputs=("MODEL",), host=True, num_cpus=0)  # the stage actors reserve their own
def load_split_dit(checkpoint: str, stages: int = 2, n_blocks_remote: int | None = None, codec: str = "raw",
                   base_dir: str = ".") -> Any:
    """Split a FLUX checkpoint over stage actors (``Mesh.split``); the model lives in this node's host actor."""
    from mesh_ray.split.model import make_split

    ckpt = _path(base_dir, checkpoint)
    if n_blocks_remote is not None:
        return make_split(str(ckpt), n_blocks_remote=n_blocks_remote, codec=codec)
    return make_split(str(ckpt), stages=stages, codec=codec)


@node("Sample", outputs=("LATENT",))
def sample(model: Any, width: int = 256, height: int = 256, steps: int = 4, seed: int = 0, guidance: float = 3.5,
           txt_len: int = 16, conditioning_seed: int = 0, progress: Any = None) -> Any:
    """Sample a latent [1, C, h, w] with seeded stand-in text conditioning; reports every step."""
    from mesh_ray.split.sampler import generate, random_conditioning

    txt, y = random_conditioning(model.config, batch=1, txt_len=txt_len, seed=conditioning_seed)
    return generate(model, txt, y, width=width, height=height, steps=steps, seed=seed, guidance=guidance,
                    progress=False, callback=lambda i, n, _x: progress(i, n))


@node("SampleMany", outputs=("LATENT",))
def sample_many(model: Any, count: int = 4, width: int = 256, height: int = 256, steps: int = 4, seed: int = 0,
                guidance: float = 3.5, txt_len: int = 16, conditioning_seed: int = 0, max_in_flight: int | None = None,
                progress: Any = None) -> Any:
    """Sample ``count`` latents [count, C, h, w] pipelined over the split's stages (``generate_many``):
    image i is ``Sample`` with seed + i and conditioning_seed + i; reports every step of every image."""
    import torch

    from mesh_ray.split.pipeline import ImageRequest, generate_many
    from mesh_ray.split.sampler import random_conditioning

    if count < 1:
        raise ConfigError(f"SampleMany count must be at least 1, got {count}")
    reqs = []
    for i in range(count):
        txt, y = random_conditioning(model.config, batch=1, txt_len=txt_len, seed=conditioning_seed + i)
        reqs.append(ImageRequest(txt=txt, y=y, width=width, height=height, steps=steps, seed=seed + i, guidance=guidance))
    done = [0]

    def step(_ev: Any) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], count * steps)

    res = generate_many(model, reqs, max_in_flight=max_in_flight, progress=False, callback=step)
    return torch.cat(res.latents, dim=0)


@node("LatentPreview", outputs=("IMAGE",))
def latent_preview(latent: Any) -> np.ndarray:
    """A latent -> images [B, H, W, 3] float 0..1 without a VAE (first three channels, stretched)."""
    from mesh_ray.models.images import latent_to_rgb

    return np.stack([latent_to_rgb(x) for x in latent]).astype(np.float32) / 255.0


@node("LoadVAE", outputs=("VAE",), host=True, num_cpus=0)  # the decoder replicas reserve their own
def load_vae(checkpoint: str, replicas: int = 1, output_dir: str = "outputs/vae", base_dir: str = ".") -> Any:
    """Start a VAE decode service (``VaeService``) for a checkpoint; it lives in this node's host actor."""
    from mesh_ray.vae.service import VaeService

    return VaeService(_path(base_dir, checkpoint), replicas=replicas, output_dir=_path(base_dir, output_dir))


@dataclass(frozen=True)
class PromisedImages:
    """A decode still running on a VAE replica (picklable: the Ray ref and a label)."""

    ref: Any
    label: str


@node("VAEDecode", outputs=("IMAGE",))
def vae_decode(vae: Any, latent: Any, mode: str = "wait", save: str | None = None) -> Any:
    """Decode on the VAE service: ``wait`` -> images, ``forget`` -> request id (the replica writes
    ``output_dir/{save}_*.png``), ``promise`` -> promised images for SavePromisedImage."""
    if mode not in VAE_MODES:
        raise ConfigError(f"VAEDecode mode {mode!r} is unknown: use {', '.join(VAE_MODES)}")
    if mode == "wait":
        return vae.decode(latent, mode="wait").numpy()
    if mode == "forget":
        return vae.decode(latent, mode="forget", save=save or "mesh_ray")
    p = vae.decode(latent, mode="promise")
    return PromisedImages(p.ref, p.label)


@node("SavePromisedImage", outputs=("PATHS",), output=True)
def save_promised_image(images: Any, directory: str = "outputs/workflow", timeout_s: float = 600.0,
                        base_dir: str = ".") -> list[str]:
    """Write promised images once the decode finishes (the deferred "Save Promised Image")."""
    from mesh_ray.vae.promise import Promise, save_promised

    if not isinstance(images, PromisedImages):
        raise ConfigError(f"SavePromisedImage takes the output of VAEDecode with mode 'promise', got "
                          f"{type(images).__name__}: set mode to promise or use SaveImage")
    handles = save_promised([Promise(images.ref, images.label, timeout_s)], _path(base_dir, directory))
    return [str(p) for h in handles for p in h.result(timeout_s)]


@node("SaveImage", outputs=("PATHS",), output=True)
def save_image(images: Any, directory: str = "outputs/workflow", prefix: str = "mesh_ray",
               metadata: dict | None = None, base_dir: str = ".") -> list[str]:
    """Write images [B, H, W, C] (0..1) as ``{directory}/{prefix}_{k:02d}.png``, atomically."""
    from mesh_ray.models.images import save_images

    written = save_images(np.asarray(images), _path(base_dir, directory), metadata, stem=prefix, as_dir=True)
    return [str(p) for p in written]
