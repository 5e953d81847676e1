"""Entropy stage after quantisation: zstd on the CPU, nvCOMP on the GPU where installed, or none.

Sections are uint8 tensors. ``none`` and nvCOMP leave them on their device (``header.pack`` copies
the result to the host once); zstd runs on the host, so a CUDA section is copied there first.
"""

from __future__ import annotations

import functools
import threading

import torch
import zstandard

from mesh_ray.codec.errors import CodecError
from mesh_ray.codec.hostio import upload

ZSTD_LEVEL = 3  # level 3 is the knee of zstd's speed/size curve on quantised activations
NVCOMP_ALGORITHM = "GDeflate"

_local = threading.local()  # nvCOMP codecs are thread-local (nvCOMP's rule): one per thread, device, stream


@functools.lru_cache(maxsize=1)
def nvcomp_status() -> tuple[bool, str]:
    """(usable, reason) for nvCOMP: it needs the nvidia-nvcomp package and a CUDA device."""
    if not torch.cuda.is_available():
        return False, "no CUDA device: quant8 uses zstd on the CPU"
    try:
        from nvidia import nvcomp  # noqa: F401  (lazy: fails without NVIDIA libraries)
    except Exception as exc:  # ImportError, or a missing shared library
        return False, f"nvCOMP not importable ({type(exc).__name__}): pip install nvidia-nvcomp-cu12 (or -cu13 for CUDA 13); quant8 uses zstd"
    return True, "nvCOMP (GDeflate) on the GPU"


def resolve(entropy: str, on_cuda: bool) -> str:
    """The entropy stage to use: 'auto' -> nvcomp for CUDA tensors when usable, else zstd."""
    if entropy == "auto":
        return "nvcomp" if on_cuda and nvcomp_status()[0] else "zstd"
    if entropy == "nvcomp" and not nvcomp_status()[0]:
        raise CodecError(f"entropy='nvcomp' asked but {nvcomp_status()[1]}: use entropy='zstd' or 'auto'")
    return entropy


def compress(data: torch.Tensor, entropy: str) -> "bytes | torch.Tensor":
    """Entropy-code one flat uint8 section: bytes (zstd) or a uint8 tensor (none: as given; nvCOMP: on the GPU)."""
    if entropy == "none" or data.numel() == 0:
        return data
    if entropy == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data.cpu().numpy())
    if entropy == "nvcomp":
        return _nvcomp_encode(data if data.is_cuda else data.cuda())
    raise CodecError(f"unknown entropy stage {entropy!r}: use zstd, nvcomp or none")


def decompress(data: memoryview, entropy: str, size: int, device: torch.device) -> torch.Tensor:
    """Undo ``compress`` -> a fresh flat uint8 tensor of ``size`` bytes on ``device`` (a mismatch is a corrupt payload)."""
    if entropy == "none" or size == 0:
        n = len(data)
        out = upload(data, device) if n == size else None
    elif entropy == "zstd":
        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd section does not decompress ({exc}): the payload is corrupt; resend it") from None
        n = len(raw)
        out = upload(raw, device) if n == size else None
    elif entropy == "nvcomp":
        usable, reason = nvcomp_status()
        if not usable:
            raise CodecError(f"payload is nvCOMP-coded but this machine cannot decode it: {reason}; "
                             "or encode with entropy='zstd'")
        out = _nvcomp_decode(data, device)  # pragma: no cover (GPU)
        n = out.numel()  # pragma: no cover (GPU)
    else:
        raise CodecError(f"unknown entropy stage {entropy!r}: decode with the mesh-ray version that encoded it")
    if n != size:
        raise CodecError(f"entropy-coded section decodes to {n} bytes, expected {size}: "
                         "the payload is corrupt; resend it")
    return out


def _nvcomp_codec(device: torch.device, stream: int):  # pragma: no cover (GPU)
    """This thread's nvCOMP codec for a device and a CUDA stream (torch's current one), made once."""
    from nvidia import nvcomp

    codecs = _local.__dict__.setdefault("codecs", {})
    key = (device.index, stream)
    if key not in codecs:
        if len(codecs) >= 8:
            codecs.clear()
        codecs[key] = nvcomp.Codec(algorithm=NVCOMP_ALGORITHM, device_id=device.index, cuda_stream=stream)
    return codecs[key]


def _cuda(device: torch.device) -> torch.device:  # pragma: no cover (GPU)
    """A CUDA device with its index filled in (nvCOMP runs on the current one for a CPU target)."""
    if device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _nvcomp_tensor(array, stream: int) -> torch.Tensor:  # pragma: no cover (GPU)
    """An nvCOMP device Array -> a flat uint8 torch tensor of its ``buffer_size`` bytes (a copy nvCOMP does not own)."""
    t = torch.from_dlpack(array.to_dlpack(cuda_stream=stream))
    return t.reshape(-1).view(torch.uint8)[: array.buffer_size].clone()


def _nvcomp_encode(data: torch.Tensor) -> torch.Tensor:  # pragma: no cover (GPU)
    """GDeflate on the GPU, in torch's current stream: device bytes in, device bytes out."""
    from nvidia import nvcomp

    device = _cuda(data.device)
    stream = torch.cuda.current_stream(device).cuda_stream
    codec = _nvcomp_codec(device, stream)
    return _nvcomp_tensor(codec.encode(nvcomp.as_array(data, cuda_stream=stream)), stream)


def _nvcomp_decode(data: memoryview, device: torch.device) -> torch.Tensor:  # pragma: no cover (GPU)
    """An nvCOMP section (wire bytes) -> uint8 tensor on ``device``; decoded on the GPU."""
    from nvidia import nvcomp

    gpu = _cuda(device)
    stream = torch.cuda.current_stream(gpu).cuda_stream
    src = upload(data, gpu)
    try:
        out = _nvcomp_tensor(_nvcomp_codec(gpu, stream).decode(nvcomp.as_array(src, cuda_stream=stream)), stream)
    except Exception as exc:  # nvCOMP raises its own types for a damaged stream
        raise CodecError(f"nvCOMP section does not decompress ({type(exc).__name__}): the payload is corrupt; "
                         "resend it") from None
    return out.to(device)
