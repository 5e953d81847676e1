"""Exact modes: ``raw`` (the tensor's own bytes) and ``lossless`` (byte planes + entropy stage)."""

from __future__ import annotations

import numpy as np
import torch

from mesh_ray.codec import entropy as ent


def tensor_bytes(x: torch.Tensor) -> bytes:
    """The tensor's bytes in C order (bf16 viewed as int16, since numpy has no bf16)."""
    x = x.detach().contiguous().cpu()
    return x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``tensor_bytes`` (a fresh, writable CPU tensor)."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.zeros(0, dtype=torch.uint8)
    return buf.view(dtype).reshape(shape)


def encode_lossless(x3: torch.Tensor, entropy: str) -> bytes:
    """[B, T, C] -> channel-major byte planes (sign/exponent bytes together), entropy-coded."""
    cm = x3.detach().transpose(1, 2).contiguous().cpu()
    size = cm.element_size()
    planes = cm.reshape(-1).view(torch.uint8).numpy().reshape(-1, size).T  # [bytes per value, n]
    return ent.compress(np.ascontiguousarray(planes).tobytes(), entropy)


def decode_lossless(data: memoryview, entropy: str, dtype: torch.dtype, shape3: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of ``encode_lossless`` -> [B, T, C]."""
    b, t, c = shape3
    size = torch.empty(0, dtype=dtype).element_size()
    raw = ent.decompress(data, entropy, b * t * c * size)
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(size, -1)
    values = torch.from_numpy(np.ascontiguousarray(planes.T)).reshape(-1).view(dtype)
    return values.reshape(b, c, t).transpose(1, 2).contiguous()
