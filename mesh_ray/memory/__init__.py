"""Memory management on a worker: weight streaming (offload) between host and device."""

from mesh_ray.memory.offload import AutoOffload, OffloadSpec

__all__ = ["AutoOffload", "OffloadSpec"]
