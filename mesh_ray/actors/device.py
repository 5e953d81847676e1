"""Which device and dtype a process computes on: one rule, applied where the compute happens.

CUDA when the process may use a GPU and torch sees one, else the CPU; bf16 on CUDA, fp32 on the
CPU, unless a dtype is asked for.  Stage and decoder actors apply it to themselves; the driver
applies it to its own front (embedders, final layer), so a CPU driver never forces fp32 on GPU stages.
"""

from __future__ import annotations

import torch

from mesh_ray.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the form records and options use)."""
    return str(dtype).removeprefix("torch.")


def compute_device(driver: bool = False) -> torch.device:
    """CUDA when torch sees a GPU and (inside a Ray actor) Ray gave this process one, else CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    import ray  # here, not at the top: models and benchmarks use this module without Ray

    in_worker = ray.is_initialized() and not driver
    return torch.device("cuda" if not in_worker or len(ray.get_gpu_ids()) > 0 else "cpu")


def resolve_dtype(device: torch.device, dtype: str | None = "auto") -> torch.dtype:
    """The dtype to compute in on ``device``: ``dtype`` when given, else bf16 on CUDA and fp32 on CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use {', '.join(DTYPE_NAMES)}")
    return DTYPES[dtype]


def pick_device(dtype: str | None = "auto", driver: bool = False) -> tuple[torch.device, torch.dtype]:
    """This process's compute device and dtype (see the module docstring for the rule)."""
    device = compute_device(driver)
    return device, resolve_dtype(device, dtype)


def narrower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype with fewer bytes per element (``a`` on a tie): what a link between the two carries."""
    return b if b.itemsize < a.itemsize else a
