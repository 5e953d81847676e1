"""``mesh-ray bench comfy --arch ... --json`` (the real ComfyUI KSampler unsplit and split) and
``mesh-ray bench comfy-vae --json``: one JSON line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from comfy_host import REPO


def bench(args: list[str], comfyui_dir, tmp_path, timeout: float) -> tuple[dict, str]:
    """``mesh-ray bench ARGS --json`` in a child process on ``comfyui_dir``: its JSON line and its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(COMFYUI_PATH=str(comfyui_dir), MESH_RAY_CACHE_DIR=str(tmp_path / "shards"),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "mesh_ray.cli", "bench", *args, "--json"],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def test_bench_comfy_json(comfyui_dir, tmp_path):
    r, _ = bench(["comfy", "--arch", "ltxav", "--size", "16", "--steps", "1", "--repeats", "1", "--hidden", "256",
                  "--blocks", "4"], comfyui_dir, tmp_path, 600)
    assert r["arch"] == "ltxav" and r["n_blocks_remote"] == 2 and r["stage_calls_per_step"] == 1.0, r
    assert r["step_ms_unsplit"] > 0 and r["step_ms_split"] > 0 and r["bytes_per_step"] > 0, r
    assert r["loaded_bytes_split"] == r["local_param_bytes_split"] < r["local_param_bytes_unsplit"], r
    assert r["peak_rss_above_start_unsplit"] >= 0 and r["peak_rss_above_start_split"] >= 0, r
    assert r["max_abs_diff"] == 0.0, r  # ComfyUI's own blocks on the stage: bit for bit


def test_bench_comfy_vae_json(comfyui_dir, tmp_path):
    """``mesh-ray bench comfy-vae --json``: local VAE Decode vs Mesh VAE Decode, peak memory side by side."""
    r, stdout = bench(["comfy-vae", "--frames", "9", "--size", "64", "--flux-size", "64", "--ltx-channels", "8",
                       "--flux-ch", "32", "--repeats", "1"], comfyui_dir, tmp_path, 900)
    assert [row["vae"] for row in r["rows"]] == ["ltx-video", "flux1"]
    for row in r["rows"]:
        assert row["max_abs_diff"] == 0.0  # the remote decode is ComfyUI's own, bit for bit
        assert row["heap_mb_local"] > 0 and row["heap_mb_remote"] >= 0 and "heap_mb_ratio_remote_over_local" in row
    assert "peak memory growth" in stdout


def test_bench_comfy_queue_json(comfyui_dir, tmp_path):
    """``mesh-ray bench comfy-queue --json`` (small): the keys the issue names, nothing lost, every prompt done."""
    r, stdout = bench(["comfy-queue", "--prompts", "1", "--steps", "1", "--size", "64", "--hidden", "128",
                       "--rounds", "1"], comfyui_dir, tmp_path, 900)
    assert r["lost"] == 0 and r["one_worker"]["finished"] == r["two_workers"]["finished"] == 3, r
    assert r["speedup"] > 0 and set(r["share_of_fair"]) == {"A", "B"}, r
    assert len(r["machine_parallel"]) == len(r["machine_parallel_torch"]) == 2, r
    assert r["model_bytes_shipped"] > 0 and r["transfer_bytes_per_prompt"] > 0 and "goals_met" in r, r
    assert "speedup 2 workers over 1" in stdout
