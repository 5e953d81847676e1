"""mesh-ray: run FLUX-family diffusion transformers across the GPUs of a Ray cluster.

Names are imported on first use, so that ``mesh_ray.models``, ``mesh_ray.codec`` and
``mesh_ray.memory`` work in a process without Ray (a GPU box that only runs the model, a
benchmark); everything that talks to Ray imports it when it is first touched.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (one table: the lazy loader and __all__ both read it)
_EXPORTS = {
    "ConnectOptions": "mesh_ray.config", "SplitOptions": "mesh_ray.config", "StageSpec": "mesh_ray.config",
    "CheckpointError": "mesh_ray.errors", "ClusterError": "mesh_ray.errors", "ConfigError": "mesh_ray.errors",
    "MeshError": "mesh_ray.errors", "StageError": "mesh_ray.errors",
    "Mesh": "mesh_ray.mesh", "connect": "mesh_ray.mesh",
    "OffloadSpec": "mesh_ray.memory",
    "inspect": "mesh_ray.models.checkpoint", "load_blocks": "mesh_ray.models.checkpoint",
    "write_random_checkpoint": "mesh_ray.models.checkpoint",
    "Promise": "mesh_ray.vae.promise", "save_promised": "mesh_ray.vae.promise",
    "ImageRequest": "mesh_ray.split.pipeline", "ManyResult": "mesh_ray.split.pipeline", "generate_many": "mesh_ray.split.pipeline",
    "Plan": "mesh_ray.split.plan", "auto_plan": "mesh_ray.split.planner", "plan_for": "mesh_ray.split.planner",
    "generate": "mesh_ray.split.sampler", "random_conditioning": "mesh_ray.split.sampler", "schedule": "mesh_ray.split.sampler",
    "SplitModel": "mesh_ray.split.model",
    "VaeService": "mesh_ray.vae.service",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
