"""Tensors <-> wire bytes: the codec's only moves between a device and the host.

Encoding keeps every section on the tensor's device until ``header.pack`` copies it once into the
payload; decoding brings each section to the target device with ``upload`` (pinned memory on CUDA).
"""

from __future__ import annotations

import numpy as np
import torch

Section = bytes | memoryview | torch.Tensor  # a payload section: host bytes, or a flat uint8 tensor on any device


def byte_view(x: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in C order as a flat uint8 tensor on its own device (bf16 included)."""
    x = x.detach().contiguous()
    return x.reshape(-1).view(torch.uint8) if x.numel() else torch.zeros(0, dtype=torch.uint8, device=x.device)


def tensor_from_bytes(data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Host bytes -> a fresh, writable CPU tensor of ``dtype`` and ``shape`` (the inverse of ``byte_view``)."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.zeros(0, dtype=torch.uint8)
    return buf.view(dtype).reshape(shape)


def upload(data: bytes | memoryview, device: torch.device) -> torch.Tensor:
    """Wire bytes -> a fresh uint8 tensor on ``device`` (CUDA: one copy into pinned memory, one DMA)."""
    if device.type != "cuda" or len(data) == 0:
        return tensor_from_bytes(data, torch.uint8, (len(data),)).to(device)
    host = torch.empty(len(data), dtype=torch.uint8, pin_memory=True)
    host.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return host.to(device, non_blocking=True)  # torch keeps the pinned block until the copy is done
