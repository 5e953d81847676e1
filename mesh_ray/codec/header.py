"""The wire format: a fixed binary header, the shape, a section table, then the sections.

Layout (little-endian), one source of truth for every reader and writer:

    offset size field
    0      4    magic b"MRAC"
    4      1    format version (FORMAT_VERSION)
    5      1    codec id (CODEC_IDS)
    6      1    dtype id (DTYPE_IDS)
    7      1    ndim (1..8)
    8      1    entropy id (ENTROPY_IDS)
    9      1    hevc backend id that encoded the stream (BACKEND_IDS)
    10     1    qp
    11     1    predictors: low nibble image group, high nibble prefix group (PREDICTORS)
    12     2    tile_dim (0 = none)
    14     1    flags: bit0 clip used, bit1 image grid given by the caller
    15     1    number of sections
    16     4    prefix (text) tokens
    20     4    layout grid height
    24     4    layout grid width
    28     4    CRC32 of the whole payload with these 4 bytes zeroed
    32     8*n  shape (uint64 each)
    ...    8*s  section lengths (uint64 each), then the sections back to back
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from mesh_ray.codec.errors import CodecError
from mesh_ray.codec.hostio import Section  # noqa: F401  (the sections pack takes)

MAGIC = b"MRAC"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sBBBBBBBBHBBIIII")
_CRC_AT = 28

CODEC_IDS = {"raw": 0, "quant8": 1, "lossless": 2, "hevc": 3}
DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ENTROPY_IDS = {"none": 0, "zstd": 1, "nvcomp": 2}
BACKEND_IDS = {"none": 0, "x265": 1, "nvenc": 2}
PREDICTORS = {"none": 0, "delta1d": 1, "delta2d": 2}


def _name(table: dict, value: int, what: str) -> object:
    for k, v in table.items():
        if v == value:
            return k
    raise CodecError(f"payload names unknown {what} id {value}: decode it with the mesh-ray version that encoded it")


@dataclass
class Header:
    """Everything needed to decode a payload, without looking at the spec that made it."""

    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    entropy: str = "none"
    backend: str = "none"
    qp: int = 0
    pred_img: str = "none"
    pred_prefix: str = "none"
    tile_dim: int = 0
    clipped: bool = False
    grid_given: bool = False
    prefix: int = 0
    grid: tuple[int, int] = (0, 0)
    version: int = FORMAT_VERSION
    sections: list[int] = field(default_factory=list)


def pack(head: Header, sections: "list[Section]") -> bytes:
    """Header + sections -> one payload with its CRC32 filled in.

    Sections may be host bytes or flat uint8 tensors on any device: tensors are copied straight into
    the payload buffer (pinned when one is on a GPU, so each is one DMA, all awaited together).
    """
    flags = int(head.clipped) | (int(head.grid_given) << 1)
    lengths = [s.numel() if isinstance(s, torch.Tensor) else len(s) for s in sections]
    fixed = _FIXED.pack(MAGIC, head.version, CODEC_IDS[head.codec], DTYPE_IDS[head.dtype], len(head.shape),
                        ENTROPY_IDS[head.entropy], BACKEND_IDS[head.backend], head.qp,
                        PREDICTORS[head.pred_img] | (PREDICTORS[head.pred_prefix] << 4),
                        head.tile_dim, flags, len(sections), head.prefix, head.grid[0], head.grid[1], 0)
    tables = struct.pack(f"<{len(head.shape)}Q{len(sections)}Q", *head.shape, *lengths)
    gpus = {s.device for s in sections if isinstance(s, torch.Tensor) and s.is_cuda}
    buf = torch.empty(len(fixed) + len(tables) + sum(lengths), dtype=torch.uint8, pin_memory=bool(gpus))
    view = buf.numpy()
    at = len(fixed) + len(tables)
    view[:at] = np.frombuffer(fixed + tables, dtype=np.uint8)
    for s, n in zip(sections, lengths):
        if isinstance(s, torch.Tensor):
            buf[at:at + n].copy_(s, non_blocking=s.is_cuda)
        else:
            view[at:at + n] = np.frombuffer(s, dtype=np.uint8)
        at += n
    for device in gpus:
        torch.cuda.current_stream(device).synchronize()
    struct.pack_into("<I", view, _CRC_AT, zlib.crc32(view))
    return view.tobytes()


def unpack(data: bytes) -> tuple[Header, list[memoryview]]:
    """Payload -> (header, sections); a CodecError for anything corrupt, truncated or unknown."""
    view = memoryview(data)
    if len(view) < _FIXED.size:
        raise CodecError(f"payload of {len(view)} bytes is shorter than the {_FIXED.size}-byte codec header: "
                         "it was truncated in transit; resend it")
    (magic, version, codec, dtype, ndim, entropy, backend, qp, preds, tile_dim, flags, nsect,
     prefix, gh, gw, crc) = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"payload does not start with the mesh-ray codec magic {MAGIC!r} (got {bytes(magic)!r}): "
                         "pass bytes made by mesh_ray.codec.encode")
    if version != FORMAT_VERSION:
        raise CodecError(f"payload has codec format version {version}, this mesh-ray reads version "
                         f"{FORMAT_VERSION}: run the same mesh-ray version on both ends")
    end_tables = _FIXED.size + 8 * (ndim + nsect)
    if len(view) < end_tables:
        raise CodecError("payload is truncated inside the codec header: resend it")
    tables = struct.unpack_from(f"<{ndim}Q{nsect}Q", view, _FIXED.size)
    lengths = list(tables[ndim:])
    if len(view) != end_tables + sum(lengths):
        raise CodecError(f"payload is {len(view)} bytes but its header announces {end_tables + sum(lengths)}: "
                         "it was truncated or padded in transit; resend it")
    check = zlib.crc32(view[:_CRC_AT])
    check = zlib.crc32(b"\0\0\0\0", check)
    check = zlib.crc32(view[_CRC_AT + 4:], check)
    if check != crc:
        raise CodecError(f"payload CRC32 mismatch (stored {crc:08x}, computed {check:08x}): "
                         "the bytes were corrupted in transit; resend them")
    head = Header(codec=_name(CODEC_IDS, codec, "codec"), dtype=_name(DTYPE_IDS, dtype, "dtype"),
                  shape=tuple(tables[:ndim]), entropy=_name(ENTROPY_IDS, entropy, "entropy"),
                  backend=_name(BACKEND_IDS, backend, "backend"), qp=qp,
                  pred_img=_name(PREDICTORS, preds & 15, "predictor"),
                  pred_prefix=_name(PREDICTORS, preds >> 4, "predictor"), tile_dim=tile_dim,
                  clipped=bool(flags & 1), grid_given=bool(flags & 2), prefix=prefix, grid=(gh, gw),
                  version=version, sections=lengths)
    out, at = [], end_tables
    for n in lengths:
        out.append(view[at:at + n])
        at += n
    return head, out


def header_size(data: bytes) -> int:
    """Bytes of header (fixed part, shape and section table) at the start of a payload."""
    ndim, nsect = data[7], data[15]
    return _FIXED.size + 8 * (ndim + nsect)
