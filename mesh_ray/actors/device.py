"""Which device and dtype an actor computes on: the GPU Ray gave it, else the CPU."""

from __future__ import annotations

import ray
import torch

from mesh_ray.errors import ConfigError


def pick_device(dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA when this process was given a GPU and torch sees one, else CPU; bf16 on GPU, fp32 on CPU."""
    gpu = torch.cuda.is_available() and (not ray.is_initialized() or len(ray.get_gpu_ids()) > 0)
    device = torch.device("cuda" if gpu else "cpu")
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return device, (torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32)
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return device, names[dtype]
