"""quant8 groups on the wire: binary scales, predicted + entropy-coded codes, exact side list."""

from __future__ import annotations

import numpy as np
import torch

from mesh_ray.codec import entropy as ent
from mesh_ray.codec.errors import CodecError
from mesh_ray.codec.quant import Quantized, choose_predictor, dequantize, predict, quantize, unpredict
from mesh_ray.codec.raw import tensor_bytes, tensor_from_bytes


def pack_scales(qz: Quantized) -> bytes:
    """Per-row lo then step, float32 little-endian, [B, C] each."""
    return tensor_bytes(torch.stack((qz.lo, qz.step)).float())


def unpack_scales(data: memoryview, b: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) != 2 * b * c * 4:
        raise CodecError(f"scale section has {len(data)} bytes, expected {2 * b * c * 4}: the payload is corrupt")
    both = tensor_from_bytes(data, torch.float32, (2, b, c))
    return both[0], both[1]


def pack_clips(qz: Quantized, entropy: str) -> tuple[bytes, bytes]:
    """Side list: delta-coded flat indices (entropy-coded int64) and the exact values (dtype bits)."""
    idx = qz.clip_idx.cpu().numpy().astype(np.int64)
    deltas = np.diff(idx, prepend=0).astype("<i8")
    return ent.compress(deltas.tobytes(), entropy), tensor_bytes(qz.clip_val)


def unpack_clips(idx_data: memoryview, val_data: memoryview, entropy: str, dtype: torch.dtype,
                 total: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = torch.empty(0, dtype=dtype).element_size()
    if len(val_data) % size:
        raise CodecError("side-list section is not a whole number of values: the payload is corrupt")
    k = len(val_data) // size
    idx = np.cumsum(np.frombuffer(ent.decompress(idx_data, entropy, 8 * k), dtype="<i8"))
    if k and (idx.min() < 0 or idx.max() >= total):
        raise CodecError("side-list index points outside the tensor: the payload is corrupt")
    return torch.from_numpy(idx.astype(np.int64)), tensor_from_bytes(val_data, dtype, (k,))


def encode_group(x: torch.Tensor, clip: float | None, entropy: str,
                 candidates: tuple[str, ...]) -> tuple[list[bytes], str]:
    """Channel-major [B, C, h, w] -> (4 sections: scales, codes, side indices, side values; predictor)."""
    b, c, h, w = x.shape
    qz = quantize(x.reshape(b, c, h * w), clip)
    codes = qz.q.cpu().numpy().reshape(b, c, h, w)
    pred = choose_predictor(codes, candidates) if codes.size else "none"
    payload = ent.compress(np.ascontiguousarray(predict(codes, pred)).tobytes(), entropy)
    idx, val = pack_clips(qz, entropy)
    return [pack_scales(qz), payload, idx, val], pred


def decode_group(sections: list[memoryview], shape: tuple[int, int, int, int], dtype: torch.dtype,
                 entropy: str, pred: str) -> torch.Tensor:
    """Inverse of ``encode_group`` -> [B, C, h, w] of ``dtype``."""
    b, c, h, w = shape
    lo, step = unpack_scales(sections[0], b, c)
    codes = np.frombuffer(ent.decompress(sections[1], entropy, b * c * h * w), dtype=np.uint8).reshape(b, c, h, w)
    codes = unpredict(codes, pred)
    q = torch.from_numpy(codes if codes.flags.writeable else codes.copy()).reshape(b, c, h * w)
    idx, val = unpack_clips(sections[2], sections[3], entropy, dtype, b * c * h * w)
    return dequantize(Quantized(lo, step, q, idx, val), dtype).reshape(b, c, h, w)
