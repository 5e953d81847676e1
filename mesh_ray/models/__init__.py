"""Models (no Ray here): FLUX transformers, checkpoint inspection and slim loading."""

from mesh_ray.models.checkpoint import CheckpointInfo, inspect, load_blocks, save_checkpoint, write_random_checkpoint
from mesh_ray.models.flux import PRESETS, BlockCond, BlockState, Flux, FluxConfig, preset

__all__ = ["PRESETS", "BlockCond", "BlockState", "CheckpointInfo", "Flux", "FluxConfig", "inspect",
           "load_blocks", "preset", "save_checkpoint", "write_random_checkpoint"]
