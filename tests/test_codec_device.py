"""The codec as torch ops on the tensor's device: the committed wire format byte for byte on the CPU,
the same bytes from a GPU, nvCOMP on device buffers, NVDEC with kept decoders fed from memory.

The CUDA tests skip on a machine without a GPU (or without nvCOMP / PyNvVideoCodec) and say why.
"""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from codec_golden import EXACT, GOLDEN, HEVC_FRAME, HEVC_GOLDEN, cases
from helpers import last_json, run
from mesh_ray.codec import CodecError, decode, decode_sections, encode, encode_sections
from mesh_ray.codec import entropy, nvenc
from mesh_ray.codec.header import Header, pack, unpack
from mesh_ray.codec.quant import predict, unpredict

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).cpu()


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN))


def golden_cases(golden, skip_entropy=()):
    """(key, input, spec, grid, txt_len, payload, expected decode) of every committed case."""
    for in_key, key, _, spec, grid, txt_len in cases():
        if spec.get("entropy") in skip_entropy:
            continue
        x = golden[f"{in_key}/input"]
        want = golden[f"{key}/decoded"] if key.split("/")[-1] not in EXACT else x
        yield key, x, spec, grid, txt_len, golden[f"{key}/payload"].numpy().tobytes(), want


def test_cpu_torch_path_writes_and_reads_the_committed_payloads(golden):
    """The torch quant8 on the CPU = the numpy path it replaced: every payload byte, every decoded bit."""
    n = 0
    for key, x, spec, grid, txt_len, payload, want in golden_cases(golden):
        assert encode(x, spec, grid=grid, txt_len=txt_len) == payload, key
        assert torch.equal(bits(decode(payload)), bits(want)), key
        n += 1
    assert n == 8 * 3 * 5  # inputs x dtypes x specs


def test_committed_payloads_cover_every_predictor_and_the_side_list(golden):
    preds, side = set(), 0
    for _, _, spec, _, _, payload, _ in golden_cases(golden):
        head, sections = unpack(payload)
        if head.codec == "quant8":
            preds |= {head.pred_img, head.pred_prefix}
            side += len(sections[3]) + len(sections[7])
    assert preds == {"none", "delta1d", "delta2d"} and side > 0


def test_predictors_wrap_mod_256_and_invert():
    q = torch.tensor([[[[0, 255, 1], [3, 2, 250]]]], dtype=torch.uint8)
    assert predict(q, "delta1d").tolist() == [[[[0, 255, 2], [2, 255, 248]]]]
    assert predict(q, "delta2d").tolist() == [[[[0, 255, 2], [3, 0, 246]]]]  # row diffs, then column diffs of those
    gen = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 5, 7), (1, 4, 1, 9), (1, 2, 6, 1), (1, 1, 0, 4)):
        q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        for kind in ("none", "delta1d", "delta2d"):
            assert torch.equal(unpredict(predict(q, kind), kind), q), (shape, kind)


def test_pack_takes_tensor_sections_like_bytes():
    t = torch.arange(300, dtype=torch.int16).view(torch.uint8)
    head = Header("raw", torch.float16, (300,))
    assert pack(head, [t]) == pack(head, [t.numpy().tobytes()])


def test_encode_and_decode_are_sections_then_wire_bytes():
    x = torch.randn(1, 20, 16).to(torch.bfloat16)
    head, sections = encode_sections(x, "quant8", grid=(4, 4), txt_len=4)
    payload = pack(head, sections)
    assert payload == encode(x, "quant8", grid=(4, 4), txt_len=4)
    assert torch.equal(bits(decode_sections(*unpack(payload))), bits(decode(payload)))


def test_bench_codec_speed_on_the_cpu_path():
    out = run("bench", "codec", "--device", "cpu", "--quick", "--repeats", "1", "--json", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = last_json(out)
    assert res["device"] == "cpu" and res["shape"] == [1, 32 + 16 * 16, 192]
    rows = {(r["spec"]["mode"], r["spec"].get("entropy"), bool(r["spec"].get("lossless"))): r for r in res["rows"]}
    for key in (("quant8", "none", False), ("quant8", "zstd", False), ("quant8", "none", True), ("raw", None, False)):
        r = rows[key]
        assert r["encode_gb_s"] > 0 and r["decode_gb_s"] > 0 and r["encode_sections_gb_s"] > 0 and r["ratio"] > 0
    assert "nvCOMP" in rows[("quant8", "nvcomp", False)]["skipped"]
    assert "pyav_ms" in res["hevc_frame"] or "skipped" in res["hevc_frame"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_bench_codec_on_cuda_without_a_gpu_is_one_line():
    out = run("bench", "codec", "--device", "cuda", "--quick", timeout=300)
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "--device cuda" in lines[0] and "--device cpu" in lines[0]


# ---- on a GPU ----------------------------------------------------------------------------------

@CUDA
def test_gpu_encode_writes_the_cpu_bytes_and_decodes_the_same_bits(golden):  # pragma: no cover (GPU)
    """Without nvCOMP the payload of a CUDA tensor is the CPU's, byte for byte; decoding on the GPU gives
    the CPU's bits, on the GPU."""
    for key, x, spec, grid, txt_len, payload, want in golden_cases(golden):
        assert encode(x.cuda(), spec, grid=grid, txt_len=txt_len) == payload, key
        got = decode(payload, "cuda")
        assert got.is_cuda and torch.equal(bits(got), bits(want)), key


@CUDA
@pytest.mark.skipif(not entropy.nvcomp_status()[0], reason=f"needs nvCOMP: {entropy.nvcomp_status()[1]}")
def test_nvcomp_payloads_decode_on_both_sides(golden):  # pragma: no cover (GPU)
    """nvCOMP on device buffers: the payload decodes on the GPU and through nvCOMP to a CPU tensor, to the
    bits of the zstd payload; a CPU tensor coded with nvCOMP gives the same bytes."""
    for key, x, spec, grid, txt_len, _, want in golden_cases(golden, skip_entropy=("none", None)):
        spec = spec | {"entropy": "nvcomp"}
        payload = encode(x.cuda(), spec, grid=grid, txt_len=txt_len)
        assert unpack(payload)[0].entropy == "nvcomp", key
        assert payload == encode(x, spec, grid=grid, txt_len=txt_len), key
        for device in ("cuda", "cpu"):
            assert torch.equal(bits(decode(payload, device)), bits(want)), (key, device)
    auto = encode(golden["grid-txt/bf16/input"].cuda(), "quant8", grid=(6, 7), txt_len=10)
    assert unpack(auto)[0].entropy == "nvcomp"  # auto picks nvCOMP for a CUDA tensor


@CUDA
@pytest.mark.skipif(not nvenc.decoder_status()[0], reason=f"needs NVDEC: {nvenc.decoder_status()[1]}")
def test_nvdec_equals_pyav_and_keeps_one_decoder_per_frame_size():  # pragma: no cover (GPU)
    """The x265 stream made here decodes on NVDEC to PyAV's frames; consecutive payloads, and threads,
    share one kept decoder (fed from memory), and every tensor equals PyAV's."""
    fx = load_file(str(HEVC_GOLDEN))
    frames = nvenc.decode_frames(fx["a/stream"].numpy().tobytes(), 1, HEVC_FRAME, torch.device("cuda"))
    assert frames.is_cuda and torch.equal(frames.cpu(), fx["a/frames"])
    before = nvenc.decoders_created()
    payloads = {n: fx[f"{n}/payload"].numpy().tobytes() for n in ("a", "b")}
    for n in ("a", "b", "a", "b"):
        assert torch.equal(bits(decode(payloads[n], "cuda", hevc_decoder="nvdec")), bits(fx[f"{n}/decoded"])), n
    assert nvenc.decoders_created() == before  # the decoder of the first call, reused
    errors: list[str] = []

    def worker(names):
        for n in names:
            if not torch.equal(bits(decode(payloads[n], "cuda")), bits(fx[f"{n}/decoded"])):
                errors.append(n)

    threads = [threading.Thread(target=worker, args=(["a", "b"] * 3,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)


@CUDA
@pytest.mark.skipif(not nvenc.decoder_status()[0], reason=f"needs NVDEC: {nvenc.decoder_status()[1]}")
def test_nvdec_stream_of_another_size_is_one_line():  # pragma: no cover (GPU)
    fx = load_file(str(HEVC_GOLDEN))
    with pytest.raises(CodecError) as info:
        nvenc.decode_frames(fx["a/stream"].numpy().tobytes(), 1, (160, 160), torch.device("cuda"))
    assert "\n" not in str(info.value)
