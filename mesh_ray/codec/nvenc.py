"""GPU HEVC: PyNvVideoCodec's NVENC encoder and NVDEC decoder, imported lazily.

NVENC is absent on A100/A30/H100/H200/H20/B200-class GPUs; NVDEC is present on all of them.  The
bitstream is the same HEVC Main 4:4:4 stream x265 writes, so either side can decode the other's.
NVDEC decoders are kept per (GPU, frame size) and fed packets from memory.  Not exercised on the
CPU-only test machine: see docs/codec.md, "GPU check".
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field

import numpy as np
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
    if not hasattr(nvc, "PacketData"):
        return False, (f"PyNvVideoCodec {getattr(nvc, '__version__', '?')} cannot take packets from memory: "
                       "pip install 'pynvvideocodec>=2.0'; hevc decodes with PyAV")
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


def decode_frames(stream: "bytes | memoryview", count: int, frame_hw: tuple[int, int],
                  device: torch.device) -> torch.Tensor:  # pragma: no cover (GPU)
    """Annex-B stream -> uint8 frames [F, 3, H, W] on the GPU via NVDEC, fed from memory.

    The decoder of this (GPU, frame size) is kept and reused: the whole stream goes in as one
    packet, an empty packet ends it (the decoder hands out its last frame and is ready for the next
    stream). A kept decoder that fails is dropped and the stream decoded once more on a fresh one.
    """
    usable, reason = decoder_status()
    if not usable:
        raise CodecError(f"payload asked for NVDEC but {reason}")
    gpu = device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()
    data = np.frombuffer(stream, dtype=np.uint8)  # the packet points into this buffer: keep it alive until done
    for fresh in (False, True):
        entry = _decoder(gpu, frame_hw, fresh)
        with entry.lock:
            try:
                frames = _decode_all(entry.decoder, data, frame_hw)
            except Exception as exc:  # PyNvVideoCodec raises its own types for a damaged stream
                frames, error = None, f"{type(exc).__name__}: {exc}"
        if frames is not None and len(frames) == count:
            return torch.stack(frames).to(device)
        _drop_decoder(gpu, frame_hw, entry)
        if frames is not None:
            error = f"{len(frames)} frames, the header announces {count}"
    raise CodecError(f"NVDEC could not decode the HEVC stream ({error}): the payload is corrupt; resend it")


@dataclass
class _Session:
    """One NVDEC decoder and the lock that keeps it to one stream at a time."""

    decoder: object
    lock: threading.Lock = field(default_factory=threading.Lock)


_sessions_lock = threading.Lock()
_sessions: dict[tuple[int, int, int], _Session] = {}
_created = [0]  # decoders created in this process (a test checks that they are reused)


def decoders_created() -> int:
    """How many NVDEC decoders this process has created (one per GPU and frame size when all goes well)."""
    return _created[0]


def _decoder(gpu: int, frame_hw: tuple[int, int], fresh: bool) -> _Session:  # pragma: no cover (GPU)
    """The kept decoder for this GPU and frame size (a new one if there is none or ``fresh``)."""
    key = (gpu, *frame_hw)
    with _sessions_lock:
        entry = _sessions.get(key)
        if entry is None or fresh:
            nvc, _ = _import()
            height, width = frame_hw
            entry = _sessions[key] = _Session(nvc.CreateDecoder(gpuid=gpu, codec=nvc.cudaVideoCodec.HEVC,
                                                                usedevicememory=True, maxwidth=width, maxheight=height))
            _created[0] += 1
        return entry


def _drop_decoder(gpu: int, frame_hw: tuple[int, int], entry: _Session) -> None:  # pragma: no cover (GPU)
    with _sessions_lock:
        if _sessions.get((gpu, *frame_hw)) is entry:
            del _sessions[(gpu, *frame_hw)]


def _decode_all(dec, data: np.ndarray, frame_hw: tuple[int, int]) -> list[torch.Tensor]:  # pragma: no cover (GPU)
    """Feed one whole stream, then end it; every frame copied out at once (the decoder reuses its buffers)."""
    nvc, _ = _import()
    height, width = frame_hw
    frames = []
    for pointer, size in ((data.ctypes.data, data.size), (0, 0)):  # the stream, then an empty packet: its end
        packet = nvc.PacketData()
        packet.bsl_data, packet.bsl, packet.pts, packet.decode_flag = pointer, size, 0, 0
        for frame in dec.Decode(packet):
            t = torch.from_dlpack(frame)
            if t.numel() != 3 * height * width:
                raise CodecError(f"NVDEC frame has {t.numel()} bytes, a {width}x{height} YUV444 frame has "
                                 f"{3 * height * width}")
            frames.append(t.reshape(3, height, width).clone())
    return frames
