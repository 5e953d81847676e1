"""encode(tensor, spec) -> bytes and decode(bytes) -> tensor: the codec's one interface.

Each is two steps: the sections are computed on the tensor's device (``encode_sections``; on the
target device for ``decode_sections``), and ``header.pack`` / ``header.unpack`` turn them into
wire bytes and back (the host part: one copy and the CRC32).
"""

from __future__ import annotations

import math

import torch

from mesh_ray.codec import entropy as ent
from mesh_ray.codec import hevc, nvenc, quant8, x265
from mesh_ray.codec.errors import CodecError
from mesh_ray.codec.header import DTYPE_IDS, Header, pack, unpack
from mesh_ray.codec.hostio import Section, byte_view, upload
from mesh_ray.codec.layout import as_3d, from_grid, split_tokens, square_grid, to_grid
from mesh_ray.codec.probe import choose_spec, hevc_backend
from mesh_ray.codec.quant import Quantized, dequantize, quantize
from mesh_ray.codec.raw import decode_lossless, encode_lossless
from mesh_ray.codec.spec import CodecSpec

_PREFIX_PRED = ("none", "delta1d")


def encode(tensor: torch.Tensor, spec: "CodecSpec | dict | str | None" = None,
           grid: tuple[int, int] | None = None, txt_len: int = 0) -> bytes:
    """Code a [B, tokens, channels] (or 2-D) bf16/fp16/fp32 tensor; ``grid=(h, w)`` marks the last
    h*w tokens as the image-token grid. ``mode='auto'`` is resolved as a cross-node link.
    The work runs on the tensor's device (CPU or CUDA); only the finished sections reach the host."""
    return pack(*encode_sections(tensor, spec, grid, txt_len))


def encode_sections(tensor: torch.Tensor, spec: "CodecSpec | dict | str | None" = None,
                    grid: tuple[int, int] | None = None, txt_len: int = 0) -> tuple[Header, list[Section]]:
    """``encode`` without the packing: the header and the sections, tensors still on the tensor's device."""
    spec = choose_spec(spec, same_node=False)
    if tensor.dtype not in DTYPE_IDS:
        raise CodecError(f"codec takes bf16, fp16 or fp32 tensors, got {tensor.dtype}: cast it first")
    x3 = as_3d(tensor.detach())
    b, t, c = x3.shape
    shape = tuple(tensor.shape)
    if spec.mode == "raw":
        return Header("raw", tensor.dtype, shape), [byte_view(tensor)]
    entropy = ent.resolve(spec.entropy, tensor.is_cuda)
    if spec.lossless:
        return Header("lossless", tensor.dtype, shape, entropy=entropy), [encode_lossless(x3, entropy)]
    prefix = split_tokens(t, grid, txt_len)
    pre_sections, pre_pred = quant8.encode_group(x3[:, :prefix].transpose(1, 2).reshape(b, c, 1, prefix),
                                                 spec.clip_percentile, entropy, _PREFIX_PRED)
    img = x3[:, prefix:]
    n = t - prefix
    head = Header(spec.mode, tensor.dtype, shape, entropy=entropy, qp=spec.qp, pred_prefix=pre_pred,
                  clipped=spec.clip_percentile is not None, grid_given=grid is not None, prefix=prefix)
    if spec.mode == "quant8":
        head.grid = tuple(grid) if grid is not None else ((1, n) if n else (0, 0))
        cands = ("none", "delta1d", "delta2d") if grid is not None else _PREFIX_PRED
        img_sections, head.pred_img = quant8.encode_group(_grid_or_empty(img, head.grid), spec.clip_percentile,
                                                          entropy, cands)
        return head, pre_sections + img_sections
    head.grid = tuple(grid) if grid is not None else square_grid(n)
    head.backend = hevc_backend(spec.backend)
    return head, pre_sections + _encode_hevc(_grid_or_empty(img, head.grid), spec, head, entropy)


def decode(data: bytes, device: "torch.device | str | None" = None, *, hevc_decoder: str = "auto") -> torch.Tensor:
    """Payload -> tensor (on ``device``, default CPU); a one-line CodecError instead of a wrong tensor.
    The work runs on ``device`` (CUDA: sections are uploaded, then decoded there).
    ``hevc_decoder``: auto (NVDEC for a CUDA device when usable, else PyAV), ``pyav`` or ``nvdec``."""
    head, sections = unpack(data)
    return decode_sections(head, sections, device, hevc_decoder=hevc_decoder)


def decode_sections(head: Header, sections: list[memoryview], device: "torch.device | str | None" = None, *,
                    hevc_decoder: str = "auto") -> torch.Tensor:
    """``decode`` after ``header.unpack``: the sections of a checked payload -> tensor on ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = head.shape
    if head.codec in ("raw", "lossless") and len(sections) != 1:
        raise CodecError(f"payload has {len(sections)} sections, {head.codec} needs 1: it is corrupt")
    if head.codec == "raw":
        want = math.prod(shape) * torch.empty(0, dtype=head.dtype).element_size()
        if len(sections[0]) != want:
            raise CodecError(f"raw section has {len(sections[0])} bytes, shape {shape} needs {want}: it is corrupt")
        return upload(sections[0], device).view(head.dtype).reshape(shape)
    b, t, c = (1, *shape) if len(shape) == 2 else shape
    if len(shape) not in (2, 3):
        raise CodecError(f"payload shape {shape} is not 2-D or 3-D: the payload is corrupt")
    if head.codec == "lossless":
        return decode_lossless(sections[0], head.entropy, head.dtype, (b, t, c), device).reshape(shape)
    p, n, (gh, gw) = head.prefix, t - head.prefix, head.grid
    if p > t or gh * gw < n:
        raise CodecError(f"payload layout ({p} prefix tokens, grid {gh}x{gw}) does not fit {t} tokens: it is corrupt")
    if len(sections) != 8:  # prefix group (4) + image group (4) for quant8 and hevc alike
        raise CodecError(f"payload has {len(sections)} sections, {head.codec} needs 8: it is corrupt")
    pre = quant8.decode_group(sections[:4], (b, c, 1, p), head.dtype, head.entropy, head.pred_prefix, device)
    if head.codec == "quant8":
        img = quant8.decode_group(sections[4:], (b, c, gh, gw), head.dtype, head.entropy, head.pred_img, device)
    else:
        img = _decode_hevc(sections[4:], head, (b, c, gh, gw), device, hevc_decoder)
    x3 = torch.cat((pre.reshape(b, c, p).transpose(1, 2), from_grid(img, n)), dim=1)
    return x3.reshape(shape).contiguous()


def _grid_or_empty(img: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    b, n, c = img.shape
    if n == 0:
        return img.new_zeros(b, c, *grid)
    return to_grid(img, grid)


def _tile_dim(spec: CodecSpec, tiles: int, grid: tuple[int, int]) -> int:
    return spec.tile_dim or hevc.auto_tile_dim(tiles, grid)


def _encode_hevc(planes: torch.Tensor, spec: CodecSpec, head: Header, entropy: str) -> list[Section]:
    """Channel-major [B, C, h, w] -> [scales, HEVC stream, side indices, side values]."""
    b, c, h, w = planes.shape
    qz = quantize(planes.reshape(b, c, h * w), spec.clip_percentile)
    head.tile_dim = _tile_dim(spec, b * c, (h, w)) if h * w else 1
    if head.tile_dim > 0xFFFF:
        raise CodecError(f"tile_dim {head.tile_dim} does not fit the header: use tile_dim <= 65535")
    stream = b""
    if h * w and b * c:
        frames = hevc.tiles_to_planes(qz.q.reshape(b * c, h, w), head.tile_dim)
        if head.backend == "nvenc":
            stream = nvenc.encode_frames(frames, spec.qp)
        else:
            usable, reason = x265.status()
            if not usable:
                raise CodecError(f"hevc/x265 asked but {reason}; or use mode='quant8'")
            stream = x265.encode_frames(frames, spec.qp)
    idx, val = quant8.pack_clips(qz, entropy)
    return [quant8.pack_scales(qz), stream, idx, val]


def _decode_hevc(sections: list, head: Header, shape: tuple[int, int, int, int], device: torch.device,
                 which: str) -> torch.Tensor:
    """[scales, stream, side indices, side values] -> channel-major [B, C, h, w] through ``planes_to_tiles``."""
    b, c, h, w = shape
    lo, step = quant8.unpack_scales(sections[0], b, c, device)
    idx, val = quant8.unpack_clips(sections[2], sections[3], head.entropy, head.dtype, b * c * h * w, device)
    if h * w == 0 or b * c == 0:
        q = torch.zeros(b, c, h * w, dtype=torch.uint8, device=device)
    else:
        count = hevc.frame_count(b * c, head.tile_dim)
        frames = decode_stream(sections[1], count, hevc.frame_shape(head.tile_dim, (h, w)), device, which)
        q = hevc.planes_to_tiles(frames, b * c, head.tile_dim, (h, w)).reshape(b, c, h * w).to(device)
    return dequantize(Quantized(lo, step, q, idx, val), head.dtype).reshape(b, c, h, w)


def decode_stream(stream: "bytes | memoryview", count: int, frame_hw: tuple[int, int], device: torch.device,
                  which: str = "auto") -> torch.Tensor:
    """HEVC stream of ``count`` frames of ``frame_hw`` -> uint8 frames [F, 3, H, W] with NVDEC (CUDA device,
    when usable; frames stay on the GPU) or PyAV (CPU)."""
    if which not in ("auto", "pyav", "nvdec"):
        raise CodecError(f"unknown hevc_decoder {which!r}: use auto, pyav or nvdec")
    if which == "nvdec" or (which == "auto" and device.type == "cuda" and nvenc.decoder_status()[0]):
        usable, reason = nvenc.decoder_status()
        if not usable:
            raise CodecError(f"this payload was to be decoded with NVDEC but {reason}; or pass hevc_decoder='pyav'")
        return nvenc.decode_frames(stream, count, frame_hw, device)
    usable, reason = x265.status()
    if not usable:
        raise CodecError(f"this machine cannot decode an HEVC payload: {reason}")
    return x265.decode_frames(bytes(stream), count)
