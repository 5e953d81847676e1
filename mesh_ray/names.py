"""Names shared by the API, the CLI and the workflow nodes (importing this costs nothing: no torch, no Ray)."""

from __future__ import annotations

from typing import Literal, get_args

VaeMode = Literal["wait", "forget", "promise"]
VAE_MODES: tuple[str, ...] = get_args(VaeMode)  # how VaeService.decode returns (docs/vae.md)

MESH_NAMESPACE = "mesh-ray"  # the Ray namespace of mesh-ray's named, detached actors
COMFY_WORKER_PREFIX = "mesh-ray/comfy-worker-"  # ComfyUI worker actors: this prefix and their index
