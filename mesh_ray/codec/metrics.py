"""Per-transfer metrics: bytes on the wire against raw, coding time, and (debug) the error."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from mesh_ray.codec.api import decode, encode
from mesh_ray.codec.spec import CodecSpec


@dataclass
class TransferMetrics:
    """One transfer: raw and wire bytes, encode/decode ms; cosine/max_abs only with debug metrics."""

    raw_bytes: int
    wire_bytes: int
    encode_ms: float
    decode_ms: float | None = None
    cosine: float | None = None
    max_abs: float | None = None

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(1, self.wire_bytes)

    def as_dict(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


def error_stats(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """cosine, rel_l2 and max_abs of ``got`` against ``ref`` (computed in fp64 on the CPU)."""
    a, b = ref.detach().double().cpu().reshape(-1), got.detach().double().cpu().reshape(-1)
    na, nb = a.norm().item(), b.norm().item()
    cos = 1.0 if na == nb == 0 else max(-1.0, min(1.0, float(a @ b) / max(na * nb, 1e-300)))
    diff = a - b
    return {"cosine": cos, "rel_l2": diff.norm().item() / max(na, 1e-300),
            "max_abs": diff.abs().max().item() if diff.numel() else 0.0}


def encode_with_metrics(tensor: torch.Tensor, spec: "CodecSpec | dict | str | None" = None,
                        grid: tuple[int, int] | None = None, txt_len: int = 0) -> tuple[bytes, TransferMetrics]:
    """``encode`` plus its metrics; with ``debug_metrics`` it also decodes locally to measure the error."""
    spec = CodecSpec.parse(spec)
    t0 = time.perf_counter()
    data = encode(tensor, spec, grid, txt_len)
    m = TransferMetrics(tensor.numel() * tensor.element_size(), len(data), (time.perf_counter() - t0) * 1e3)
    if spec.debug_metrics:
        got, m.decode_ms = _timed_decode(data, tensor.device)
        stats = error_stats(tensor, got)
        m.cosine, m.max_abs = stats["cosine"], stats["max_abs"]
    return data, m


def decode_with_metrics(data: bytes, device: "torch.device | str | None" = None) -> tuple[torch.Tensor, float]:
    """``decode`` plus its time in ms (the receiving side's half of TransferMetrics)."""
    return _timed_decode(data, device)


def measure(tensor: torch.Tensor, spec: "CodecSpec | dict | str | None" = None,
            grid: tuple[int, int] | None = None, txt_len: int = 0) -> tuple[TransferMetrics, torch.Tensor]:
    """Encode, decode and compare: full metrics and the decoded tensor."""
    data, m = encode_with_metrics(tensor, CodecSpec.parse(spec).model_copy(update={"debug_metrics": False}),
                                  grid, txt_len)
    got, m.decode_ms = _timed_decode(data, tensor.device)
    stats = error_stats(tensor, got)
    m.cosine, m.max_abs = stats["cosine"], stats["max_abs"]
    return m, got


def _timed_decode(data: bytes, device) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    got = decode(data, device)
    return got, (time.perf_counter() - t0) * 1e3
