"""GPU HEVC: PyNvVideoCodec's NVENC encoder and NVDEC decoder, imported lazily.

NVENC is absent on A100/A30/H100/H200/H20/B200-class GPUs; NVDEC is present on all of them.  The
bitstream is the same HEVC Main 4:4:4 stream x265 writes, so either side can decode the other's.
Not exercised on the CPU-only test machine: see docs/codec.md, "GPU check".
"""

from __future__ import annotations

import functools
import os
import re
import tempfile

import torch

from mesh_ray.codec.errors import CodecError

NO_NVENC = ("A100", "A30", "A800", "H100", "H800", "H200", "H20", "B200", "B100", "GB200")


def _import():
    try:
        import PyNvVideoCodec as nvc  # noqa: N813  (lazy: fails without the NVIDIA video libraries)
    except Exception as exc:
        return None, f"PyNvVideoCodec not installed ({type(exc).__name__}): pip install 'mesh-ray[nvenc]'"
    return nvc, ""


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


@functools.lru_cache(maxsize=1)
def encoder_status() -> tuple[bool, str]:
    """(usable, reason) for NVENC: decided by the device name, then by creating a real encoder."""
    name = gpu_name()
    if name is None:
        return False, "no CUDA device: hevc uses x265"
    short = next((m for m in NO_NVENC if re.search(rf"\b{m}\b", name.upper())), None)
    if short:
        return False, f"no NVENC encoder on this GPU ({short}): hevc uses x265"
    nvc, why = _import()
    if nvc is None:
        return False, why + "; hevc uses x265"
    try:
        _create_encoder(nvc, 256, 256, 18)
    except Exception as exc:
        return False, f"NVENC encoder creation failed on {name} ({type(exc).__name__}: {exc}): hevc uses x265"
    return True, f"NVENC HEVC 4:4:4 on {name}"


@functools.lru_cache(maxsize=1)
def decoder_status() -> tuple[bool, str]:
    """(usable, reason) for NVDEC through PyNvVideoCodec."""
    name = gpu_name()
    if name is None:
        return False, "no CUDA device: hevc decodes with PyAV on the CPU"
    nvc, why = _import()
    if nvc is None:
        return False, why + "; hevc decodes with PyAV"
    try:
        nvc.CreateDecoder(gpuid=0, codec=nvc.cudaVideoCodec.HEVC, usedevicememory=True)
    except Exception as exc:
        return False, f"NVDEC decoder creation failed on {name} ({type(exc).__name__}: {exc}): hevc decodes with PyAV"
    return True, f"NVDEC HEVC on {name}"


def _create_encoder(nvc, width: int, height: int, qp: int):
    return nvc.CreateEncoder(width, height, "YUV444", True, codec="hevc", preset="P4",
                             tuning_info="ultra_low_latency", rc="constqp", constqp=str(qp), bf="0",
                             gop="100000", idrperiod="100000", repeatspspps="1")


@functools.lru_cache(maxsize=8)
def _encoder(width: int, height: int, qp: int):  # pragma: no cover (GPU with NVENC)
    nvc, why = _import()
    if nvc is None:
        raise CodecError(why)
    return _create_encoder(nvc, width, height, qp)


def encode_frames(frames: torch.Tensor, qp: int) -> bytes:  # pragma: no cover (GPU with NVENC)
    """uint8 frames [F, 3, H, W] -> one Annex-B stream via NVENC, starting with an IDR frame."""
    usable, reason = encoder_status()
    if not usable:
        raise CodecError(f"backend='nvenc' asked but {reason}: use backend='x265' or 'auto'")
    count, _, height, width = frames.shape
    nvc, _ = _import()
    force_idr = getattr(getattr(nvc, "NV_ENC_PIC_FLAGS", None), "FORCEIDR", None)
    # A cached encoder can start a new stream only with a forced IDR; otherwise use a fresh one.
    enc = _encoder(width, height, qp) if force_idr is not None else _create_encoder(nvc, width, height, qp)
    out = bytearray()
    for i in range(count):
        planar = frames[i].reshape(3 * height, width).contiguous().cpu().numpy()
        out += bytes(enc.Encode(planar, force_idr) if i == 0 and force_idr is not None else enc.Encode(planar))
    out += bytes(enc.EndEncode())
    return bytes(out)


def decode_frames(stream: bytes, count: int, device: torch.device) -> torch.Tensor:  # pragma: no cover (GPU)
    """Annex-B stream -> uint8 frames [F, 3, H, W] on the GPU via NVDEC, flushing every frame."""
    usable, reason = decoder_status()
    if not usable:
        raise CodecError(f"payload asked for NVDEC but {reason}")
    import PyNvVideoCodec as nvc  # noqa: N813

    with tempfile.NamedTemporaryFile(suffix=".hevc", delete=False) as fh:
        fh.write(bytes(stream))
        path = fh.name
    try:
        demux = nvc.CreateDemuxer(filename=path)
        dec = nvc.CreateDecoder(gpuid=device.index or 0, codec=nvc.cudaVideoCodec.HEVC, usedevicememory=True)
        frames = []
        for packet in demux:  # the demuxer's last, empty packet flushes the decoder
            for frame in dec.Decode(packet):
                frames.append(torch.from_dlpack(frame).reshape(3, frame.shape[0] // 3, -1).clone())
    finally:
        os.unlink(path)
    if len(frames) != count:
        raise CodecError(f"NVDEC gave {len(frames)} frames, the header announces {count}: the payload is corrupt")
    return torch.stack(frames).to(device)
