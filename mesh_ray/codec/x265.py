"""Software HEVC: PyAV's libx265 encoder and hevc decoder (the fallback where NVENC is absent)."""

from __future__ import annotations

import threading
from fractions import Fraction

import numpy as np
import torch

from mesh_ray.codec.errors import CodecError

PRESET = "ultrafast"  # measured: 3x faster than superfast for ~1 % more bytes on activation frames
_PARAMS = ("qp={qp}:bframes=0:keyint=-1:scenecut=0:repeat-headers=1:info=0:log-level=error"
           ":aq-mode=0:psy-rd=0:psy-rdoq=0:frame-threads=1:rc-lookahead=0")

_lock = threading.Lock()
_encoders: dict[tuple[int, int, int], list] = {}  # (width, height, qp) -> [context, next pts]


def status() -> tuple[bool, str]:
    """(usable, reason) for the x265 backend."""
    try:
        import av
    except Exception as exc:
        return False, f"PyAV not importable ({type(exc).__name__}): pip install 'mesh-ray[video]'"
    for name, mode in (("libx265", "w"), ("hevc", "r")):
        try:
            av.codec.Codec(name, mode)
        except Exception:
            what = "encoder" if mode == "w" else "decoder"
            return False, f"PyAV {av.__version__} has no {name} {what}: install a PyAV wheel built with it"
    return True, f"libx265 via PyAV {av.__version__} on the CPU"


def _encoder(width: int, height: int, qp: int):
    """A libx265 context for this frame size and QP, created once and reused (no lookahead, no B)."""
    import av

    key = (width, height, qp)
    entry = _encoders.get(key)
    if entry is None:
        enc = av.CodecContext.create("libx265", "w")
        enc.width, enc.height, enc.pix_fmt = width, height, "yuv444p"
        enc.time_base, enc.framerate = Fraction(1, 25), Fraction(25)
        enc.options = {"preset": PRESET, "tune": "zerolatency", "forced-idr": "1",
                       "x265-params": _PARAMS.format(qp=qp)}
        enc.open()
        entry = _encoders[key] = [enc, 0]
    return entry


def encode_frames(frames: torch.Tensor, qp: int) -> bytes:
    """uint8 frames [F, 3, H, W] -> one Annex-B stream (a packet per frame, the first an IDR)."""
    import av

    count, _, height, width = frames.shape
    arr = frames.cpu().numpy()
    packets: list[bytes] = []
    with _lock:
        entry = _encoder(width, height, qp)
        enc = entry[0]
        for i in range(count):
            vf = av.VideoFrame.from_ndarray(arr[i], format="yuv444p")
            vf.pts, entry[1] = entry[1], entry[1] + 1
            if i == 0:
                vf.pict_type = av.video.frame.PictureType.I
            packets += [bytes(p) for p in enc.encode(vf)]
    if len(packets) != count:
        # A cached encoder must answer each frame at once; anything else would mix tensors.
        with _lock:
            _encoders.pop((width, height, qp), None)
        raise CodecError(f"libx265 returned {len(packets)} packets for {count} frames: "
                         "this x265 build buffers frames; use mode='quant8'")
    return b"".join(packets)


def decode_frames(stream: bytes, count: int) -> torch.Tensor:
    """Annex-B stream -> uint8 frames [F, 3, H, W] via PyAV's parser and hevc decoder, flushing every frame."""
    import av

    dec = av.CodecContext.create("hevc", "r")
    out: list[np.ndarray] = []
    try:
        for packet in dec.parse(bytes(stream)) + dec.parse(None) + [None]:
            out += [f.to_ndarray(format="yuv444p") for f in dec.decode(packet)]
    except (av.error.FFmpegError, ValueError) as exc:
        raise CodecError(f"HEVC stream does not decode ({type(exc).__name__}): the payload is corrupt; resend it") from None
    if len(out) != count:
        raise CodecError(f"HEVC stream gave {len(out)} frames, the header announces {count}: "
                         "the payload is corrupt; resend it")
    return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
