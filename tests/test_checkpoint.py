"""Checkpoint inspection (header only), preset recognition, slim loading and bad files."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from mesh_ray.errors import CheckpointError
from mesh_ray.models.checkpoint import _infer_config, inspect, load_blocks, write_random_checkpoint
from mesh_ray.models.flux import PRESETS, build


@pytest.mark.parametrize("name", ["flux1-dev", "flux1-schnell", "flux2-klein-4b", "flux2-klein-9b", "flux2-dev"])
def test_released_presets_are_recognised_from_tensor_shapes(name):
    shapes = {k: tuple(v.shape) for k, v in build(PRESETS[name], "meta").state_dict().items()}
    assert _infer_config(shapes, {}, "x") == PRESETS[name]


def test_inspect_tiny_and_prefix(tmp_path):
    p = write_random_checkpoint(tmp_path / "c.safetensors", "tiny-flux2", prefix="model.diffusion_model.")
    info = inspect(p)
    assert (info.arch, info.preset, info.prefix) == ("flux2", "tiny-flux2", "model.diffusion_model.")
    assert (info.num_double, info.num_single, info.dtype) == (2, 4, "f32")
    assert info.block_bytes[0] > info.block_bytes[-1] > 0
    assert info.total_bytes < info.file_bytes
    sd = load_blocks(p, ["single:1-2"])
    assert sd and all(k.startswith(("single_blocks.1.", "single_blocks.2.")) for k in sd)
    sd = load_blocks(p, [], non_block=True)
    assert "img_in.weight" in sd and not any("_blocks." in k for k in sd)


def test_config_inferred_without_metadata(tmp_path):
    p = write_random_checkpoint(tmp_path / "c.safetensors", "tiny-flux1", embed_config=False)
    assert inspect(p).config == PRESETS["tiny-flux1"]


def test_truncated_and_corrupt_files(tmp_path, tiny_ckpts):
    data = tiny_ckpts["flux1"].read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file .*re-download or re-export"):
        inspect(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        inspect(junk)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        inspect(tmp_path / "missing.safetensors")


def test_not_flux_and_pickle(tmp_path):
    other = tmp_path / "unet.safetensors"
    save_file({"down.0.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(CheckpointError, match="is not a FLUX transformer checkpoint .*pass a FLUX.1 or FLUX.2"):
        inspect(other)
    pkl = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, pkl)
    with pytest.raises(CheckpointError, match="pickle/zip checkpoint: mesh-ray loads safetensors only"):
        inspect(pkl)


SLIM = textwrap.dedent("""
    import sys
    import psutil
    from mesh_ray.models.checkpoint import inspect, load_blocks

    def hwm():  # peak RSS of this process image (ru_maxrss would include the parent's peak)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    info = inspect(sys.argv[1])
    before = psutil.Process().memory_info().rss
    sd = load_blocks(sys.argv[1], [sys.argv[2]], info=info)
    loaded = sum(float(t.sum()) * 0 + t.numel() * t.element_size() for t in sd.values())  # reads every byte
    print(hwm() - before, int(loaded))
""")

def test_slim_loading_peak_follows_the_shard(tmp_path):
    from mesh_ray.bench.split import bench_config

    cfg = bench_config("flux1", hidden=768, heads=6, depth=1, single=15)
    p = write_random_checkpoint(tmp_path / "big.safetensors", cfg)  # ~600 MB of fp32
    info = inspect(p)
    quarter = "single:0-4"
    share = sum(info.block_bytes[1:6]) / info.file_bytes
    assert 0.2 < share < 0.3
    out = subprocess.run([sys.executable, "-c", SLIM, str(p), quarter], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_delta, loaded = map(int, out.stdout.split())
    assert loaded == sum(info.block_bytes[1:6])
    assert peak_delta < 0.40 * info.file_bytes, (peak_delta, info.file_bytes, out.stdout)


def test_header_length_with_pickle_like_first_byte_is_read(tmp_path):
    """A safetensors header length whose low byte is 0x80 (a pickle's first byte) is still safetensors."""
    import torch
    from safetensors.torch import save_file

    from mesh_ray.models.safetensors_io import read_header

    for pad in range(512):
        path = tmp_path / "x.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"p": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.skip("no metadata length gave a 0x80 first byte")
    entries, meta = read_header(path)
    assert entries == {"w": ("F32", (2,))} and meta["p"] == "x" * pad
