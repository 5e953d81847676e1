"""quant8 groups on the wire: binary scales, predicted + entropy-coded codes, exact side list.

Every step is a torch op on the group's own device (CPU or CUDA); sections stay there until
``header.pack`` copies them into the payload. The bytes are the same on every device.
"""

from __future__ import annotations

import torch

from mesh_ray.codec import entropy as ent
from mesh_ray.codec.errors import CodecError
from mesh_ray.codec.hostio import Section, byte_view, tensor_from_bytes
from mesh_ray.codec.quant import Quantized, choose_predictor, dequantize, predict, quantize, unpredict


def pack_scales(qz: Quantized) -> torch.Tensor:
    """Per-row lo then step, float32 little-endian, [B, C] each (a uint8 tensor on the group's device)."""
    return byte_view(torch.stack((qz.lo, qz.step)).float())


def unpack_scales(data: memoryview, b: int, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) != 2 * b * c * 4:
        raise CodecError(f"scale section has {len(data)} bytes, expected {2 * b * c * 4}: the payload is corrupt")
    both = tensor_from_bytes(data, torch.float32, (2, b, c)).to(device)
    return both[0], both[1]


def pack_clips(qz: Quantized, entropy: str) -> tuple[Section, torch.Tensor]:
    """Side list: delta-coded flat indices (entropy-coded int64) and the exact values (dtype bits)."""
    idx = qz.clip_idx
    deltas = torch.diff(idx, prepend=idx.new_zeros(1)) if idx.numel() else idx
    return ent.compress(byte_view(deltas), entropy), byte_view(qz.clip_val)


def unpack_clips(idx_data: memoryview, val_data: memoryview, entropy: str, dtype: torch.dtype,
                 total: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    size = torch.empty(0, dtype=dtype).element_size()
    if len(val_data) % size:
        raise CodecError("side-list section is not a whole number of values: the payload is corrupt")
    k = len(val_data) // size
    idx = ent.decompress(idx_data, entropy, 8 * k, device).view(torch.int64).cumsum(0)
    if k and bool(((idx < 0) | (idx >= total)).any()):
        raise CodecError("side-list index points outside the tensor: the payload is corrupt")
    return idx, tensor_from_bytes(val_data, dtype, (k,)).to(device)


def encode_group(x: torch.Tensor, clip: float | None, entropy: str,
                 candidates: tuple[str, ...]) -> tuple[list[Section], str]:
    """Channel-major [B, C, h, w] -> (4 sections: scales, codes, side indices, side values; predictor)."""
    b, c, h, w = x.shape
    qz = quantize(x.reshape(b, c, h * w), clip)
    codes = qz.q.reshape(b, c, h, w)
    pred = choose_predictor(codes, candidates) if codes.numel() else "none"
    payload = ent.compress(predict(codes, pred).reshape(-1), entropy)
    idx, val = pack_clips(qz, entropy)
    return [pack_scales(qz), payload, idx, val], pred


def decode_group(sections: list[memoryview], shape: tuple[int, int, int, int], dtype: torch.dtype,
                 entropy: str, pred: str, device: torch.device) -> torch.Tensor:
    """Inverse of ``encode_group`` -> [B, C, h, w] of ``dtype`` on ``device``."""
    b, c, h, w = shape
    lo, step = unpack_scales(sections[0], b, c, device)
    codes = ent.decompress(sections[1], entropy, b * c * h * w, device).reshape(b, c, h, w)
    q = unpredict(codes, pred).reshape(b, c, h * w)
    idx, val = unpack_clips(sections[2], sections[3], entropy, dtype, b * c * h * w, device)
    return dequantize(Quantized(lo, step, q, idx, val), dtype).reshape(b, c, h, w)
