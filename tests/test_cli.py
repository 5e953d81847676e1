"""The mesh-ray command line, run as a user would (subprocesses, real files, real Ray)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from mesh_ray.mesh import connect

from helpers import CLI, last_json, run  # noqa: F401



@pytest.mark.parametrize("arch, stages", [("flux1", 2), ("flux2", 3)])
def test_demo_json(tmp_path, arch, stages):
    out = run("demo", "--arch", arch, "--stages", str(stages), "--steps", "2", "--size", "64", "--out", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = last_json(out)
    for key in ("arch", "stages", "steps", "max_abs_diff_vs_local", "step_ms_split", "step_ms_local", "bytes_per_step", "image_path"):
        assert key in result
    assert (result["arch"], result["stages"], result["steps"]) == (arch, stages, 2)
    assert result["max_abs_diff_vs_local"] == 0.0
    assert result["bytes_per_step"] > 0 and Path(result["image_path"]).is_file()


def test_inspect_json_and_errors(tiny_ckpts, tmp_path):
    out = run("inspect", str(tiny_ckpts["flux2"]), "--json")
    assert out.returncode == 0, out.stderr
    info = last_json(out)
    assert (info["arch"], info["preset"], info["double_blocks"], info["single_blocks"]) == ("flux2", "tiny-flux2", 2, 4)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    out = run("inspect", str(bad))
    assert out.returncode == 1
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "not a readable safetensors file" in lines[0]
    out = run("demo", "--colour", "red")
    assert out.returncode == 2 and "No such option" in out.stderr


def test_status_from_another_process_lists_the_stages(ray_local, tiny_ckpts):
    mesh = connect()
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=2)
    try:
        out = run("status", "--address", ray.get_runtime_context().gcs_address, "--json", timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        status = last_json(out)
        mine = [a for a in status["actors"] if a["name"].startswith(f"mesh-ray/{split.id}/")]
        assert sorted(a["blocks"] for a in mine) == ["double:0-single:0", "single:1-3"]
        assert status["total"]["CPU"] >= 2
    finally:
        split.close()


def test_status_unreachable_is_one_line():
    out = run("status", "--address", "127.0.0.1:9", timeout=60)
    assert out.returncode == 1
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "cannot reach a Ray cluster at 127.0.0.1:9" in lines[0]


def test_bench_split_json_small():
    out = run("bench", "split", "--hidden", "64", "--heads", "2", "--image-tokens", "64", "--txt-tokens", "8",
              "--repeats", "1", "--transport", "object,gloo", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    r = last_json(out)
    for key in ("ratio_split_over_local", "step_ms_local", "step_ms_split", "hop_ms", "bytes_per_step"):
        assert r[key] > 0
    assert r["max_abs_diff"] == 0.0 and r["transports"] == ["object", "gloo"]
    assert [h["transport"] for h in r["by_transport"]["gloo"]["hops"]] == ["object", "gloo", "object"]
    assert all(row["ratio_split_over_local"] > 0 and row["max_abs_diff"] == 0.0 for row in r["by_transport"].values())
    assert "split/local" in out.stdout  # the table for people, before the JSON line


def test_bench_split_bad_transport_is_one_line():
    out = run("bench", "split", "--transport", "carrier-pigeon", timeout=120)
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--transport 'carrier-pigeon'" in lines[0] and "object, gloo" in lines[0]


def test_doctor_names_every_backend():
    out = run("doctor", timeout=120)
    assert out.returncode == 0
    for name in ("raw", "zstd", "nvcomp", "nvenc", "nvdec", "x265", "object", "gloo", "nccl", "cuda_ipc"):
        assert name in out.stdout


@pytest.mark.parametrize("mode", ["wait", "forget", "promise"])
def test_demo_decodes_through_the_vae_service(tmp_path, mode):
    out = run("demo", "--vae", mode, "--steps", "1", "--size", "64", "--out", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    r = last_json(out)
    assert r["vae"] == mode and r["vae_failures"] == 0
    assert len(r["image_paths"]) == 1 and Path(r["image_paths"][0]).is_file()
    from PIL import Image
    with Image.open(r["image_paths"][0]) as im:
        assert im.size == (64, 64) and im.text.get("mesh_ray.arch") == "flux1"
    if mode != "wait":
        assert r["vae_blocked_ms"] < 1000  # the caller moved on; the actor decoded and wrote the file
