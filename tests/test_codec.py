"""Codec library: round trips, exactness, stated error bounds, corrupt payloads, backends, bench."""

from __future__ import annotations

import struct

import pytest
import torch

from mesh_ray.codec import (CodecError, CodecSpec, TransferMetrics, choose_spec, decode, encode,
                            encode_with_metrics, error_stats, measure, probe_backends)
from mesh_ray.codec import hevc, nvenc, x265
from mesh_ray.codec.header import header_size, pack, unpack
from mesh_ray.errors import MeshError

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
# (name, shape, grid, txt_len): awkward on purpose
SHAPES = [
    ("grid-nonsquare-txt", (1, 10 + 6 * 7, 50), (6, 7), 10),  # 42 image tokens, 50 channels (not 48k)
    ("batch3-nogrid", (3, 20, 37), None, 0),
    ("single-token", (1, 1, 64), None, 0),
    ("2d", (33, 20), None, 0),
    ("batch2-grid-only", (2, 12, 5), (3, 4), 0),
]
MODES = {
    "raw": {"mode": "raw"},
    "lossless": {"mode": "quant8", "lossless": True},
    "quant8": {"mode": "quant8"},
    "quant8-clip": {"mode": "quant8", "clip_percentile": 95.0},
    "quant8-noentropy": {"mode": "quant8", "entropy": "none"},
    "hevc": {"mode": "hevc", "qp": 18, "backend": "x265"},
}


def sample(shape, dtype, seed=0) -> torch.Tensor:
    """Channel scales spread over 3 decades plus one outlier, so ranges and clipping matter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-1, 2, shape[-1])
    x.view(-1)[x.numel() // 2] = 5e3
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def channel_span(x: torch.Tensor) -> torch.Tensor:
    """Per (batch, channel) max - min over all tokens, broadcastable to x."""
    x3 = x.float().reshape(-1, *x.shape[-2:]) if x.dim() == 3 else x.float().unsqueeze(0)
    span = x3.amax(1, keepdim=True) - x3.amin(1, keepdim=True)
    return span.expand_as(x3).reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: c[0])
@pytest.mark.parametrize("mode", list(MODES))
def test_round_trip(mode, case, dtype):
    _, shape, grid, txt_len = case
    x = sample(shape, dtype)
    y = decode(encode(x, MODES[mode], grid=grid, txt_len=txt_len))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device.type == "cpu"
    err = (y.float() - x.float()).abs()
    rounding = HALF_ULP[dtype] * x.float().abs() * 1.01 + 1e-6 * channel_span(x)
    if mode in ("raw", "lossless"):
        assert torch.equal(bits(y), bits(x))  # byte-exact
    elif mode.startswith("quant8"):
        # docs/codec.md: |x - y| <= step / 2 + output-dtype rounding, step = channel range / 255
        assert bool((err <= channel_span(x) / 510 * (1 + 1e-5) + rounding).all()), float(err.max())
    else:
        # docs/codec.md: hevc never leaves the channel's range (hard bound at any QP)
        assert bool((err <= channel_span(x) * (1 + 1e-5) + rounding).all()), float(err.max())


def test_clipped_values_travel_exactly():
    x = sample((1, 400, 16), torch.bfloat16)
    y = decode(encode(x, {"mode": "quant8", "clip_percentile": 99.0}))
    assert y.view(-1)[x.numel() // 2] == x.view(-1)[x.numel() // 2] == 5e3
    # clipping shrinks the step of the outlier's channel: lower error than without
    plain = decode(encode(x, "quant8"))
    assert error_stats(x, y)["rel_l2"] < error_stats(x, plain)["rel_l2"]


def test_non_finite_values_survive_quant8():
    x = sample((2, 8, 8), torch.float32)
    x[0, 1, 2], x[1, 3, 4], x[1, 0, 0] = float("nan"), float("inf"), -float("inf")
    y = decode(encode(x, "quant8"))
    assert torch.isnan(y[0, 1, 2]) and y[1, 3, 4] == float("inf") and y[1, 0, 0] == -float("inf")


def smooth(shape=(1, 24 * 20, 40), grid=(24, 20), seed=0) -> torch.Tensor:
    from mesh_ray.bench.codec import smooth_field

    gen = torch.Generator().manual_seed(seed)
    f = torch.stack([smooth_field(shape[-1], *grid, 2.0, gen).reshape(shape[-1], -1).T for _ in range(shape[0])])
    return (f * torch.logspace(-1, 1, shape[-1])).to(torch.bfloat16)


def test_hevc_quality_bound_on_correlated_tokens():
    """docs/codec.md: at qp <= 18 on spatially correlated tokens, cosine >= 0.999 and ratio > 2 vs bf16."""
    x = smooth()
    data = encode(x, {"mode": "hevc", "qp": 18, "backend": "x265"}, grid=(24, 20))
    stats = error_stats(x, decode(data))
    assert stats["cosine"] >= 0.999 and x.numel() * 2 / len(data) > 2, (stats, len(data))


def test_x265_stream_decodes_through_shared_parsing_path():
    """The PyAV frames go through hevc.planes_to_tiles, the function the NVDEC path also feeds."""
    x = smooth((2, 24 * 20, 40))
    data = encode(x, {"mode": "hevc", "qp": 12, "backend": "x265", "tile_dim": 3}, grid=(24, 20))
    head, sections = unpack(data)
    assert head.codec == "hevc" and head.backend == "x265" and head.tile_dim == 3
    count = hevc.frame_count(2 * 40, 3)
    frames = x265.decode_frames(bytes(sections[5]), count)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (count, 3, 144, 144)
    tiles = hevc.planes_to_tiles(frames, 2 * 40, 3, (24, 20))
    lo, step = (t.reshape(2, 40, 1) for t in torch.frombuffer(bytearray(sections[4]), dtype=torch.float32).view(2, 2, 40))
    manual = (lo + tiles.reshape(2, 40, -1).float() * step).to(torch.bfloat16).transpose(1, 2)
    assert torch.equal(bits(manual), bits(decode(data)))


def test_tile_packing_inverts_for_awkward_sizes():
    tiles = torch.randint(0, 256, (50, 7, 9), dtype=torch.uint8)
    for td in (1, 2, 5, 17):
        frames = hevc.tiles_to_planes(tiles, td)
        assert frames.shape[-1] % 16 == 0 and frames.shape[-2] % 16 == 0 and min(frames.shape[-2:]) >= 144
        assert torch.equal(hevc.planes_to_tiles(frames, 50, td, (7, 9)), tiles)


def test_cached_x265_encoder_starts_each_stream_with_idr():
    a, b = smooth(seed=1), smooth(seed=2)
    spec = {"mode": "hevc", "qp": 18, "backend": "x265", "tile_dim": 2}
    pa = encode(a, spec, grid=(24, 20))
    cached = x265._encoders[(144, 144, 18)][0]
    pb = encode(b, spec, grid=(24, 20))
    assert x265._encoders[(144, 144, 18)][0] is cached  # one encoder per frame size, reused
    assert error_stats(b, decode(pb))["cosine"] > 0.999  # b alone decodes (fresh decoder, IDR first)
    assert error_stats(a, decode(pa))["cosine"] > 0.999


def one_line_error(data: bytes, **kw) -> str:
    with pytest.raises(CodecError) as info:
        decode(data, **kw)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, MeshError)
    return msg


@pytest.mark.parametrize("mode", ["raw", "quant8", "hevc", "lossless"])
def test_flipped_byte_is_an_error_never_a_wrong_tensor(mode):
    data = encode(sample((2, 30, 20), torch.bfloat16), MODES[mode], grid=(5, 6))
    for at in (5, 9, 40, header_size(data) + 3, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[at] ^= 0x10
        one_line_error(bytes(bad))


def test_truncated_payload_is_an_error():
    data = encode(sample((1, 16, 8), torch.float16), "quant8")
    for n in (0, 10, 31, header_size(data), len(data) - 1):
        assert "truncated" in one_line_error(data[:n])


def test_unknown_version_is_an_error():
    bad = bytearray(encode(sample((1, 4, 4), torch.float32), "raw"))
    bad[4] = 99
    assert "version 99" in one_line_error(bytes(bad))


def test_unknown_codec_id_is_an_error():
    data = encode(sample((1, 4, 4), torch.float32), "raw")
    bad = bytearray(data)
    bad[5] = 42
    struct.pack_into("<I", bad, 28, 0)
    import zlib
    struct.pack_into("<I", bad, 28, zlib.crc32(bytes(bad)))  # a well-formed payload of a codec we do not know
    assert "unknown codec id 42" in one_line_error(bytes(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer; a GPU machine can decode these")
def test_payload_needing_missing_gpu_backends_is_an_error():
    x = sample((1, 8, 4), torch.float32)
    # nvCOMP-coded quant8 payload on a machine without nvCOMP
    head, sections = unpack(encode(x, {"mode": "quant8", "lossless": True, "entropy": "none"}))
    head.entropy = "nvcomp"
    assert "nvCOMP" in one_line_error(pack(head, [bytes(s) for s in sections]))
    # an HEVC payload that must go through NVDEC, on a machine without NVDEC
    data = encode(smooth(), {"mode": "hevc", "backend": "x265"}, grid=(24, 20))
    assert "NVDEC" in one_line_error(data, hevc_decoder="nvdec")


def test_nvenc_tagged_stream_decodes_with_pyav_on_cpu():
    """NVENC and x265 write the same HEVC bitstream: a CPU receiver decodes an nvenc payload with PyAV."""
    x = smooth()
    head, sections = unpack(encode(x, {"mode": "hevc", "backend": "x265"}, grid=(24, 20)))
    head.backend = "nvenc"
    y = decode(pack(head, [bytes(s) for s in sections]))
    assert error_stats(x, y)["cosine"] > 0.999


def test_encode_rejects_bad_inputs_in_one_line():
    x = sample((1, 12, 4), torch.float32)
    for call in (lambda: encode(x.to(torch.int32), "raw"), lambda: encode(x, "quant8", grid=(4, 4)),
                 lambda: encode(x, "quant8", grid=(2, 5), txt_len=3), lambda: encode(x[0, 0], "raw"),
                 lambda: encode(x, {"mode": "hevc", "backend": "nvenc"})):
        with pytest.raises(CodecError) as info:
            call()
        assert "\n" not in str(info.value)


def test_header_is_compact_binary():
    data = encode(torch.zeros(2, 3, 4), "raw")
    assert data[:4] == b"MRAC" and header_size(data) == 32 + 8 * 3 + 8
    head, _ = unpack(data)
    assert head.shape == (2, 3, 4) and head.dtype == torch.float32


def test_spec_parse_and_one_line_errors():
    assert CodecSpec.parse({"mode": "hevc", "qp": 18}).qp == 18
    assert CodecSpec.parse("quant8").mode == "quant8" and CodecSpec.parse(None).mode == "auto"
    for bad in ({"mode": "jpeg"}, {"qp": 52}, {"quality": 3}, {"mode": "hevc", "lossless": True}, 3):
        with pytest.raises(CodecError) as info:
            CodecSpec.parse(bad)
        assert "\n" not in str(info.value)


def test_choose_spec_per_link():
    assert choose_spec("auto", same_node=True).mode == "raw"
    assert choose_spec({"mode": "auto", "backend": "x265"}, same_node=False).mode == "hevc"
    assert choose_spec({"mode": "quant8", "qp": 30}, same_node=True).mode == "quant8"  # explicit wins
    assert choose_spec({"mode": "auto", "lossless": True}, same_node=False).lossless
    if not nvenc.encoder_status()[0]:
        assert choose_spec("auto", same_node=False).mode == "quant8"
        assert choose_spec("hevc", same_node=False).backend == "x265"


def test_probe_reports_every_backend_with_a_reason():
    rows = {r.name: r for r in probe_backends()}
    assert {"raw", "zstd", "nvcomp", "nvenc", "nvdec", "x265"} <= set(rows)
    assert all(r.reason for r in rows.values()) and rows["x265"].usable
    if not torch.cuda.is_available():
        assert not rows["nvenc"].usable and "no CUDA device" in rows["nvenc"].reason


def test_transfer_metrics():
    x = sample((1, 20, 8), torch.bfloat16)
    _, m = encode_with_metrics(x, {"mode": "quant8"})
    assert isinstance(m, TransferMetrics) and m.raw_bytes == 320 and m.cosine is None and m.encode_ms >= 0
    _, m = encode_with_metrics(x, {"mode": "quant8", "debug_metrics": True})
    assert m.cosine > 0.999 and m.max_abs is not None and m.decode_ms is not None
    m, y = measure(x, "raw")
    assert m.cosine == 1.0 and m.max_abs == 0.0 and torch.equal(y, x)


def test_bench_quick_rows():
    from mesh_ray.bench.codec import format_table, run_codec_bench

    res = run_codec_bench(quick=True)
    keys = {"set", "mode", "qp", "ratio", "cosine", "rel_l2", "max_abs", "encode_ms", "decode_ms", "breakeven_mb_s"}
    assert all(keys <= set(r) for r in res["rows"])
    assert {r["set"] for r in res["rows"]} == {"tiny-flux", "synthetic"}
    modes = {r["mode"] for r in res["rows"]}
    assert {"raw", "quant8", "hevc", "baseline-minmax-trunc"} <= modes
    by = {(r["set"], r["mode"], r.get("entropy")): r for r in res["rows"]}
    for s in ("tiny-flux", "synthetic"):  # equal bytes (1 byte a value, no entropy): rounding beats truncation
        q, base = by[(s, "quant8", "none")], by[(s, "baseline-minmax-trunc", "none")]
        assert q["rel_l2"] < base["rel_l2"] and abs(q["ratio"] - base["ratio"]) / base["ratio"] < 0.05
    assert "breakeven_mb_s" in format_table(res)
