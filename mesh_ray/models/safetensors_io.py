"""Safetensors I/O for every model file (DiT and VAE): header reading, slim loading, atomic writing.

Safetensors only: a pickle or zip file is refused before anything is parsed.  Every failure is a
one-line CheckpointError naming the fix.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mesh_ray.errors import CheckpointError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor from its header entry (safetensors dtype name and shape)."""
    return DTYPE_BYTES.get(dtype, 4) * math.prod(shape)


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """({key: (dtype, shape)}, metadata) of a safetensors file; no tensor data is read."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}: check the path (workers need it too, or it is shipped to them)")
    with open(p, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with its header length (8 bytes, little-endian) and then '{'; a
    # length whose low byte is 0x80 must not be taken for a pickle.
    n = int.from_bytes(head[:8], "little")
    safetensors_like = len(head) == 9 and head[8:9] == b"{" and 8 + n <= p.stat().st_size
    if not safetensors_like and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(f"{p} is a pickle/zip checkpoint: mesh-ray loads safetensors only; "
                              f"convert it to .safetensors with a trusted tool first")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            entries = {}
            for k in f.keys():
                sl = f.get_slice(k)
                entries[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    except Exception as e:  # safetensors raises its own error types for bad headers / sizes
        raise CheckpointError(f"{p} is not a readable safetensors file (corrupt or truncated: {e}): "
                              f"re-download or re-export the checkpoint") from None
    return entries, meta


def load_tensors(path: str | os.PathLike, select: Callable[[str], str | None], *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Slim load: only the tensors whose file key ``select`` maps to a name (None: skip) are read."""
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for full in f.keys():
                key = select(full)
                if key is not None:
                    t = f.get_tensor(full)
                    out[key] = t.to(dtype) if dtype is not None and t.dtype != dtype else t
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"reading {path} failed ({e}): the file is corrupt or truncated; re-download it") from None
    return out


def write_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (temp name, then rename): a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
