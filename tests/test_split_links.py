"""Codec specs on stage links and offload inside stages, through the real split on real Ray."""

import subprocess
import sys

import pytest
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.memory import OffloadSpec

from helpers import inputs, local_model


def reference(path, b=2):
    model = local_model(path)
    args = inputs(model.config, b=b)
    with torch.inference_mode():
        return args, model(*args)


def test_lossless_quant8_links_are_exact_both_ways(mesh, tiny_ckpts):
    args, ref = reference(tiny_ckpts["flux2"])
    split = mesh.split(str(tiny_ckpts["flux2"]), stages=2, codec={"mode": "quant8", "lossless": True})
    assert torch.equal(split(*args), ref)
    links = [(t.link, t.mode) for t in split.last.transfers]
    assert links == [("caller->stage0", "quant8"), ("stage0->stage1", "quant8"), ("stage1->caller", "quant8")]
    split.close()


@pytest.mark.parametrize("codec", [{"mode": "hevc", "qp": 12, "debug_metrics": True},
                                   {"mode": "quant8", "debug_metrics": True}])
def test_lossy_links_report_their_error_and_stay_close(mesh, tiny_ckpts, codec):
    args, ref = reference(tiny_ckpts["flux1"])
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=2, codec=codec)
    out = split(*args)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99 and not torch.equal(out, ref)
    stats = split.last
    assert [t.mode for t in stats.transfers] == [codec["mode"]] * 3  # the reply is coded too
    assert stats.bytes < stats.raw_bytes
    for t in stats.transfers:
        assert t.encode_ms > 0 and t.decode_ms is not None and 0.9 < t.cosine <= 1.0 and t.max_abs >= 0
    split.close()


def test_auto_is_raw_on_one_node(mesh, tiny_ckpts):
    args, ref = reference(tiny_ckpts["flux1"])
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=3)  # codec defaults to auto
    assert torch.equal(split(*args), ref)
    assert {t.mode for t in split.last.transfers} == {"raw"}
    split.close()


def test_bad_codec_option_is_one_line(mesh, tiny_ckpts):
    with pytest.raises(ConfigError, match="codec"):
        mesh.split(str(tiny_ckpts["flux1"]), stages=2, codec={"mode": "jpeg"})


def test_split_with_offloaded_stages_equals_the_plain_split(mesh, tiny_ckpts):
    args, ref = reference(tiny_ckpts["flux1"])
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=2, offload=OffloadSpec(window_size=1))
    assert torch.equal(split(*args), ref)
    assert torch.equal(split(*args), ref)  # second pass streams along the recorded trace
    infos = split.stage_info()
    assert all(i["offload"] is not None for i in infos)
    split.close()


@pytest.mark.parametrize("codec", ["hevc", "quant8"])
def test_demo_with_codec_end_to_end(tmp_path, codec):
    out = subprocess.run([sys.executable, "-m", "mesh_ray.cli", "demo", "--codec", codec, "--steps", "2", "--size", "64",
                          "--out", str(tmp_path), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["codec"] == codec and 0 < r["bytes_per_step"] < r["raw_bytes_per_step"]
    assert 0 < r["max_abs_diff_vs_raw_split"] < 1.0
