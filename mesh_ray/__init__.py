"""mesh-ray: run FLUX-family diffusion transformers across the GPUs of a Ray cluster."""

from mesh_ray.config import ConnectOptions, SplitOptions, StageSpec
from mesh_ray.errors import CheckpointError, ClusterError, ConfigError, MeshError, StageError
from mesh_ray.mesh import Mesh, connect
from mesh_ray.models.checkpoint import inspect, load_blocks, write_random_checkpoint
from mesh_ray.sampler import generate, random_conditioning, schedule
from mesh_ray.split import SplitModel

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ClusterError", "ConfigError", "ConnectOptions", "Mesh", "MeshError", "SplitModel",
           "SplitOptions", "StageError", "StageSpec", "connect", "generate", "inspect", "load_blocks",
           "random_conditioning", "schedule", "write_random_checkpoint"]
