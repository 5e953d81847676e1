"""Golden codec payloads: the wire format as the numpy quant8 path wrote it, kept as a fixed reference;
and a small HEVC fixture for the NVDEC test on GPU machines without PyAV.

``tests/data/codec_golden.safetensors`` was made by ``python tests/codec_golden.py`` with the
numpy implementation of quant8 (mesh-ray at commit 6ef846b), before the torch path replaced it.
For every case it holds the input, the payload and that code's decode; ``tests/test_codec_device.py``
checks that today's encoder writes the same bytes and today's decoder returns the same bits.
Regenerating the file with a later mesh-ray would only compare the code with itself: don't.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "data" / "codec_golden.safetensors"
HEVC_GOLDEN = Path(__file__).parent / "data" / "hevc_golden.safetensors"
HEVC_GRID, HEVC_FRAME = (24, 20), (144, 144)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SPECS = {
    "quant8": {"mode": "quant8", "entropy": "zstd"},
    "quant8-clip": {"mode": "quant8", "entropy": "zstd", "clip_percentile": 95.0},
    "quant8-none": {"mode": "quant8", "entropy": "none"},
    "lossless": {"mode": "quant8", "lossless": True, "entropy": "zstd"},
    "raw": {"mode": "raw"},
}
EXACT = ("lossless", "raw")  # their decode is the input itself: no decoded tensor stored


def _spread(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Channel scales over 3 decades plus one outlier (ranges and clipping matter)."""
    x = torch.randn(shape, generator=gen) * torch.logspace(-1, 2, shape[-1])
    x.view(-1)[x.numel() // 2] = 5e3
    return x


def _smooth(tokens: tuple[int, int], channels: int, gen: torch.Generator) -> torch.Tensor:
    """[1, h*w, channels]: a separable random walk per channel (neighbours alike along both axes)."""
    h, w = tokens
    walk = torch.randn(channels, h, 1, generator=gen).cumsum(1) + torch.randn(channels, 1, w, generator=gen).cumsum(2)
    walk = walk + 0.05 * torch.randn(channels, h, w, generator=gen)
    return walk.reshape(channels, h * w).T.unsqueeze(0).contiguous()


def _ramp(tokens: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    """[1, tokens, channels]: slow 1-D ramps along the tokens (delta1d's case), no grid."""
    t = torch.arange(tokens, dtype=torch.float32).view(1, -1, 1)
    return torch.sin(t / 7.0 + torch.rand(1, 1, channels, generator=gen) * math.tau) * torch.logspace(0, 1, channels)


def inputs() -> dict[str, tuple[torch.Tensor, "tuple[int, int] | None", int]]:
    """name -> (fp32 tensor, grid, txt_len): awkward shapes, smooth grids, ramps, non-finite values."""
    gen = torch.Generator().manual_seed(2024)
    nonfinite = _spread((2, 8, 8), gen)
    nonfinite[0, 1, 2], nonfinite[1, 3, 4], nonfinite[1, 0, 0] = float("nan"), float("inf"), -float("inf")
    smooth = torch.cat((_spread((1, 6, 16), gen), _smooth((12, 10), 16, gen)), dim=1)
    return {
        "grid-txt": (_spread((1, 10 + 6 * 7, 24), gen), (6, 7), 10),
        "batch3-nogrid": (_spread((3, 10, 19), gen), None, 0),
        "single-token": (_spread((1, 1, 64), gen), None, 0),
        "2d": (_spread((33, 20), gen), None, 0),
        "batch2-grid": (_spread((2, 12, 5), gen), (3, 4), 0),
        "smooth-grid": (smooth, (12, 10), 6),
        "ramp-nogrid": (_ramp(60, 12, gen), None, 0),
        "nonfinite": (nonfinite, None, 0),
    }


def cases():
    """(input key, case key, input tensor, spec, grid, txt_len) for every input x dtype x spec."""
    for name, (x, grid, txt_len) in inputs().items():
        for dname, dtype in DTYPES.items():
            for sname, spec in SPECS.items():
                yield f"{name}/{dname}", f"{name}/{dname}/{sname}", x.to(dtype), spec, grid, txt_len


def make(path: Path = GOLDEN) -> dict[str, int]:
    """Encode and decode every case with this mesh-ray; write the safetensors file. Returns predictor counts."""
    from safetensors.torch import save_file

    from mesh_ray.codec import decode, encode
    from mesh_ray.codec.header import unpack

    out: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}
    for in_key, key, x, spec, grid, txt_len in cases():
        payload = encode(x, spec, grid=grid, txt_len=txt_len)
        head, _ = unpack(payload)
        for p in (head.pred_img, head.pred_prefix):
            seen[p] = seen.get(p, 0) + 1
        out[f"{in_key}/input"] = x.contiguous()
        out[f"{key}/payload"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if key.split("/")[-1] not in EXACT:
            out[f"{key}/decoded"] = decode(payload).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"made_by": "numpy quant8 path, mesh-ray commit 6ef846b"})
    return seen


def make_hevc(path: Path = HEVC_GOLDEN) -> None:
    """Two x265 payloads (one 144x144 frame each, made here where PyAV runs), PyAV's frames of the
    first and PyAV's decode of both: what NVDEC must reproduce on a GPU machine that has no PyAV."""
    from safetensors.torch import save_file

    from mesh_ray.bench.codec import smooth_field
    from mesh_ray.codec import decode, encode
    from mesh_ray.codec.header import unpack
    from mesh_ray.codec.x265 import decode_frames

    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(("a", "b")):
        gen = torch.Generator().manual_seed(10 + i)
        x = (smooth_field(12, *HEVC_GRID, 2.0, gen).reshape(12, -1).T.unsqueeze(0) * (i + 1)).to(torch.bfloat16)
        payload = encode(x, {"mode": "hevc", "backend": "x265", "qp": 18}, grid=HEVC_GRID)
        head, sections = unpack(payload)
        frames = decode_frames(bytes(sections[5]), 1)
        assert tuple(frames.shape[-2:]) == HEVC_FRAME, frames.shape
        out[f"{name}/payload"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        out[f"{name}/decoded"] = decode(payload, hevc_decoder="pyav").contiguous()
        if name == "a":
            out["a/stream"] = torch.frombuffer(bytearray(sections[5]), dtype=torch.uint8)
            out["a/frames"] = frames.contiguous()
    save_file(out, str(path), metadata={"made_by": "x265 and PyAV on the CPU machine"})


if __name__ == "__main__":  # python tests/codec_golden.py [hevc]
    import sys

    if sys.argv[1:] == ["hevc"]:
        make_hevc()
        print(HEVC_GOLDEN, HEVC_GOLDEN.stat().st_size, "bytes")
    else:
        print(make())
        print(GOLDEN, GOLDEN.stat().st_size, "bytes")
