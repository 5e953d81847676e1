"""Entropy stage after quantisation: zstd on the CPU, nvCOMP on the GPU where installed, or none."""

from __future__ import annotations

import functools

import torch
import zstandard

from mesh_ray.codec.errors import CodecError

ZSTD_LEVEL = 3  # level 3 is the knee of zstd's speed/size curve on quantised activations


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


def compress(data: bytes | memoryview, entropy: str) -> bytes:
    """Entropy-code one section."""
    if entropy == "none" or len(data) == 0:
        return bytes(data)
    if entropy == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    if entropy == "nvcomp":
        return _nvcomp_bytes(_nvcomp_codec().encode(_nvcomp_array(data)))  # pragma: no cover (GPU)
    raise CodecError(f"unknown entropy stage {entropy!r}: use zstd, nvcomp or none")


def decompress(data: memoryview, entropy: str, size: int) -> bytes:
    """Undo ``compress``; ``size`` is the expected length (a mismatch is a corrupt payload)."""
    if entropy == "none" or size == 0:
        out = bytes(data)
    elif entropy == "zstd":
        try:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd section does not decompress ({exc}): the payload is corrupt; resend it") from None
    elif entropy == "nvcomp":
        usable, reason = nvcomp_status()
        if not usable:
            raise CodecError(f"payload is nvCOMP-coded but this machine cannot decode it: {reason}; "
                             "or encode with entropy='zstd'")
        out = _nvcomp_bytes(_nvcomp_codec().decode(_nvcomp_array(data)))  # pragma: no cover (GPU)
    else:
        raise CodecError(f"unknown entropy stage {entropy!r}: decode with the mesh-ray version that encoded it")
    if len(out) != size:
        raise CodecError(f"entropy-coded section decodes to {len(out)} bytes, expected {size}: "
                         "the payload is corrupt; resend it")
    return out


@functools.lru_cache(maxsize=1)
def _nvcomp_codec():  # pragma: no cover (GPU)
    from nvidia import nvcomp

    return nvcomp.Codec(algorithm="GDeflate")


def _nvcomp_bytes(array) -> bytes:  # pragma: no cover (GPU)
    """An nvCOMP device Array -> bytes: ``cpu()`` gives a host Array with the array interface."""
    import numpy as np

    return np.asarray(array.cpu()).tobytes()


def _nvcomp_array(data):  # pragma: no cover (GPU)
    from nvidia import nvcomp

    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).cuda()
    return nvcomp.as_array(t)
