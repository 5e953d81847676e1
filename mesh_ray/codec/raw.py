"""The exact quant8 mode, ``lossless``: byte planes (sign/exponent bytes together) + the entropy stage."""

from __future__ import annotations

import torch

from mesh_ray.codec import entropy as ent
from mesh_ray.codec.hostio import byte_view


def encode_lossless(x3: torch.Tensor, entropy: str) -> "bytes | torch.Tensor":
    """[B, T, C] -> channel-major byte planes, entropy-coded, computed on x3's device."""
    cm = x3.detach().transpose(1, 2).contiguous()
    planes = byte_view(cm).reshape(-1, cm.element_size()).T  # [bytes per value, n]
    return ent.compress(planes.contiguous().reshape(-1), entropy)


def decode_lossless(data: memoryview, entropy: str, dtype: torch.dtype, shape3: tuple[int, int, int],
                    device: torch.device) -> torch.Tensor:
    """Inverse of ``encode_lossless`` -> [B, T, C] on ``device``."""
    b, t, c = shape3
    size = torch.empty(0, dtype=dtype).element_size()
    raw = ent.decompress(data, entropy, b * t * c * size, device)
    values = raw.reshape(size, -1).T.contiguous().reshape(-1).view(dtype)
    return values.reshape(b, c, t).transpose(1, 2).contiguous()
