"""Codec throughput on a device: encode/decode GB/s per spec, next to the CPU path, in one run.

Input: the synthetic activation of ``bench/codec.py`` at FLUX.1-dev size (1 x (512 + 64*64) tokens
x 3072 channels, bf16, 28.3 MB; ``quick``: 1 x (32 + 16*16) x 192). Every spec is encoded and
decoded ``repeats`` times on the device and on the CPU; GB/s is the tensor's raw bytes over the median
wall time (CUDA synchronised). The ``sections`` columns time ``encode_sections`` / ``decode_sections``
alone: the device's work without the host's (one copy of the payload and its CRC32).
Checks per spec: the device's payload decodes on the CPU to the same bits as the CPU's payload
(``cross_exact``), and, with any entropy stage but nvCOMP, the two payloads are the same bytes
(``same_bytes``). HEVC: the ms to decode one 512x512 frame with PyAV and, on a GPU, with NVDEC.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from mesh_ray.bench import goals
from mesh_ray.bench.codec import synthetic_activation
from mesh_ray.codec import CodecError, decode, decode_sections, encode, encode_sections, entropy, nvenc, x265
from mesh_ray.codec.header import unpack
from mesh_ray.tables import text_table

SPECS: list[dict[str, Any]] = [
    {"mode": "quant8", "entropy": "none"}, {"mode": "quant8", "entropy": "zstd"},
    {"mode": "quant8", "entropy": "nvcomp"}, {"mode": "quant8", "entropy": "none", "clip_percentile": 99.99},
    {"mode": "quant8", "lossless": True, "entropy": "none"}, {"mode": "quant8", "lossless": True, "entropy": "zstd"},
    {"mode": "quant8", "lossless": True, "entropy": "nvcomp"}, {"mode": "raw"},
]


def _device(name: str) -> torch.device:
    """The device to measure; a GPU that is not there is a one-line error."""
    if name not in ("cpu", "cuda"):
        raise CodecError(f"--device {name!r} is not cpu or cuda: pass --device cuda (or cpu)")
    if name == "cuda" and not torch.cuda.is_available():
        raise CodecError("--device cuda asked but torch sees no CUDA device here: run it on a GPU machine "
                         "with a CUDA torch, or pass --device cpu")
    return torch.device(name)


def _median_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall ms of ``fn`` after one warm-up call (CUDA work synchronised inside the timing)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).cpu()


def _speed(x: torch.Tensor, spec: dict, grid: tuple[int, int], txt_len: int, repeats: int) -> dict:
    """Encode/decode ms and GB/s of one spec with ``x`` on its device; the payload comes back too."""
    dev = x.device
    payload = encode(x, spec, grid, txt_len)
    head, sections = unpack(payload)
    enc = _median_ms(lambda: encode(x, spec, grid, txt_len), repeats, dev)
    enc_sec = _median_ms(lambda: encode_sections(x, spec, grid, txt_len), repeats, dev)
    dec = _median_ms(lambda: decode(payload, dev), repeats, dev)
    dec_sec = _median_ms(lambda: decode_sections(head, sections, dev), repeats, dev)
    gb = x.numel() * x.element_size() / 1e9
    return {"payload": payload, "encode_ms": enc, "decode_ms": dec, "encode_gb_s": gb / (enc / 1e3),
            "decode_gb_s": gb / (dec / 1e3), "encode_sections_gb_s": gb / (enc_sec / 1e3),
            "decode_sections_gb_s": gb / (dec_sec / 1e3)}


def _row(spec: dict, x_dev: torch.Tensor, x_cpu: torch.Tensor, grid, txt_len: int, repeats: int) -> dict:
    """One spec on the device and (when the device is a GPU) on the CPU, side by side, with the cross checks."""
    row: dict[str, Any] = {"spec": spec}
    if spec.get("entropy") == "nvcomp" and (x_dev.device.type != "cuda" or not entropy.nvcomp_status()[0]):
        why = "not on the CPU path" if x_dev.device.type != "cuda" else entropy.nvcomp_status()[1]
        return row | {"skipped": f"nvCOMP: {why}"}
    dev = _speed(x_dev, spec, grid, txt_len, repeats)
    cpu_spec = spec if spec.get("entropy") != "nvcomp" else spec | {"entropy": "zstd"}
    row |= {k: v for k, v in dev.items() if k != "payload"}
    row["ratio"] = x_dev.numel() * x_dev.element_size() / len(dev["payload"])
    if x_dev.device.type == "cpu":  # the device is the CPU path: nothing to set beside it
        return row | {"cpu_encode_gb_s": dev["encode_gb_s"], "cpu_decode_gb_s": dev["decode_gb_s"],
                      "same_bytes": None, "cross_exact": None}
    cpu = _speed(x_cpu, cpu_spec, grid, txt_len, repeats)
    return row | {"cpu_encode_gb_s": cpu["encode_gb_s"], "cpu_decode_gb_s": cpu["decode_gb_s"],
                  "encode_speedup": dev["encode_gb_s"] / cpu["encode_gb_s"],
                  "decode_speedup": dev["decode_gb_s"] / cpu["decode_gb_s"],
                  "same_bytes": dev["payload"] == cpu["payload"] if spec.get("entropy") != "nvcomp" else None,
                  "cross_exact": bool(torch.equal(_bits(decode(dev["payload"], "cpu")),
                                                  _bits(decode(cpu["payload"], "cpu"))))}


def _hevc_frame(device: torch.device, repeats: int) -> dict:
    """ms to decode one 512x512 HEVC frame (64x64 tokens, 192 channels, tile_dim 8) with PyAV and NVDEC."""
    usable, reason = x265.status()
    if not usable:
        return {"skipped": f"no x265 to make the stream: {reason}"}
    x = synthetic_activation((64, 64), 0, 192, seed=0)
    payload = encode(x, {"mode": "hevc", "backend": "x265", "qp": 18, "tile_dim": 8}, grid=(64, 64))
    out: dict[str, Any] = {"frame": [512, 512],
                           "pyav_ms": _median_ms(lambda: decode(payload, "cpu", hevc_decoder="pyav"), repeats, device)}
    if device.type == "cuda" and nvenc.decoder_status()[0]:
        out["nvdec_ms"] = _median_ms(lambda: decode(payload, device, hevc_decoder="nvdec"), repeats, device)
        out["nvdec_equals_pyav"] = bool(torch.equal(_bits(decode(payload, device, hevc_decoder="nvdec")),
                                                    _bits(decode(payload, "cpu", hevc_decoder="pyav"))))
        out["nvdec_goal_met"] = out["nvdec_ms"] <= goals.CODEC_DEVICE["nvdec_ms_per_512_frame"]
    else:
        out["nvdec"] = f"not measured: {nvenc.decoder_status()[1]}" if device.type == "cuda" else "not on the CPU path"
    return out


def run_codec_speed_bench(device: str = "cuda", quick: bool = False, repeats: int = 5) -> dict:
    """Every spec of SPECS on ``device`` next to the CPU path, plus the HEVC frame decode."""
    dev = _device(device)
    tokens_hw, txt_len, channels = ((16, 16), 32, 192) if quick else ((64, 64), 512, 3072)
    x_cpu = synthetic_activation(tokens_hw, txt_len, channels, seed=0)
    x_dev = x_cpu.to(dev)
    rows = [_row(spec, x_dev, x_cpu, tokens_hw, txt_len, repeats) for spec in SPECS]
    goal = goals.CODEC_DEVICE["quant8_gb_s"]
    on_device = [r for r in rows if r["spec"]["mode"] == "quant8" and not r["spec"].get("lossless")
                 and r["spec"].get("entropy") in ("none", "nvcomp") and "skipped" not in r]
    result = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "shape": list(x_cpu.shape), "raw_mb": x_cpu.numel() * 2 / 1e6, "repeats": repeats, "rows": rows,
              "hevc_frame": _hevc_frame(dev, repeats)}
    if dev.type == "cuda":
        result["quant8_goal_gb_s"] = goal
        result["quant8_goal_met_sections"] = all(min(r["encode_sections_gb_s"], r["decode_sections_gb_s"]) >= goal
                                                 for r in on_device)
        result["quant8_goal_met_end_to_end"] = all(min(r["encode_gb_s"], r["decode_gb_s"]) >= goal for r in on_device)
    return result


def format_table(result: dict) -> str:
    """The rows as a table for people."""
    cols = ["spec", "ratio", "encode GB/s", "decode GB/s", "enc sections", "dec sections", "cpu enc", "cpu dec",
            "same bytes", "cross exact"]
    rows = []
    for r in result["rows"]:
        name = ",".join(f"{k}={v}" for k, v in r["spec"].items() if k != "mode") or r["spec"]["mode"]
        name = f"{r['spec']['mode']}:{name}" if r["spec"]["mode"] != name else name
        if "skipped" in r:
            rows.append([name, r["skipped"]] + [""] * (len(cols) - 2))
            continue
        rows.append([name, f"{r['ratio']:.2f}"] + [f"{r[k]:.2f}" for k in (
            "encode_gb_s", "decode_gb_s", "encode_sections_gb_s", "decode_sections_gb_s", "cpu_encode_gb_s",
            "cpu_decode_gb_s")] + [str(r["same_bytes"]), str(r["cross_exact"])])
    head = f"device {result['device']} ({result['device_name']}), input {result['shape']} bf16 = {result['raw_mb']:.1f} MB"
    return head + "\n" + text_table(cols, rows) + f"\nhevc 512x512 frame: {result['hevc_frame']}"
