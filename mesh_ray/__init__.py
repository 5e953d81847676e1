"""mesh-ray: run FLUX-family diffusion transformers across the GPUs of a Ray cluster."""

from mesh_ray.config import ConnectOptions, SplitOptions, StageSpec
from mesh_ray.errors import CheckpointError, ClusterError, ConfigError, MeshError, StageError
from mesh_ray.mesh import Mesh, connect
from mesh_ray.memory import OffloadSpec
from mesh_ray.models.checkpoint import inspect, load_blocks, write_random_checkpoint
from mesh_ray.pipeline import ImageRequest, ManyResult, generate_many
from mesh_ray.planner import Plan, auto_plan, plan_for
from mesh_ray.promise import Promise, save_promised
from mesh_ray.sampler import generate, random_conditioning, schedule
from mesh_ray.split import SplitModel
from mesh_ray.vae_service import VaeService

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ClusterError", "ConfigError", "ConnectOptions", "ImageRequest", "ManyResult",
           "Mesh", "MeshError", "OffloadSpec", "Plan", "Promise", "SplitModel", "SplitOptions", "StageError",
           "StageSpec", "VaeService", "auto_plan", "connect", "generate", "generate_many", "inspect",
           "load_blocks", "plan_for", "random_conditioning", "save_promised", "schedule",
           "write_random_checkpoint"]
