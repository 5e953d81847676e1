"""What the GPU checks rely on, run on the CPU: Ray-free imports, device-drawn weights, the checks' CPU paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch
from rich.console import Console

from mesh_ray.bench.gpu_checks import check_codec, check_split, make_fixtures
from mesh_ray.cli import doctor_table
from mesh_ray.codec import BackendStatus
from mesh_ray.models.flux import PRESETS, random_state_dict

NO_RAY = """
import sys
from pathlib import Path

import pytest
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("no Ray on this machine")
sys.meta_path.insert(0, NoRay())
import mesh_ray, mesh_ray.models, mesh_ray.codec, mesh_ray.memory, mesh_ray.bench.offload, mesh_ray.bench.gpu_checks
print(mesh_ray.inspect.__module__, mesh_ray.OffloadSpec.__name__)
"""


def test_models_codec_and_memory_import_without_ray():
    # The GPU machine has no Ray: models, codecs, offload and the checks must not need it.
    out = subprocess.run([sys.executable, "-c", NO_RAY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["mesh_ray.models.checkpoint", "OffloadSpec"]


def test_random_state_dict_is_seeded_per_device():
    cfg = PRESETS["tiny-flux1"]
    a = random_state_dict(cfg, seed=3, device="cpu")
    b = random_state_dict(cfg, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.device.type == "cpu" for t in a.values())


def test_split_check_runs_and_is_exact_on_cpu():
    r = check_split("tiny-flux1", "cpu", side=8, txt_len=8)
    assert r["max_abs_diff_split_vs_local"] == 0.0
    assert r["hop_bytes"] == (64 + 8) * PRESETS["tiny-flux1"].hidden_size * 4
    for key in ("step_ms_local", "double_block_ms", "single_block_ms", "front_ms", "ratio_split_over_local"):
        assert r[key] > 0


def test_codec_check_reports_missing_nvdec_and_measures_quant8(tmp_path):
    make_fixtures(tmp_path)
    r = check_codec(tmp_path, "cpu", tokens=512 + 64, channels=64)
    assert "no CUDA device" in r["nvdec_vs_pyav"]["error"]
    rows = {json.dumps(row["spec"], sort_keys=True): row for row in r["quant8_28MB"]}
    lossless = rows[json.dumps({"entropy": "zstd", "lossless": True, "mode": "quant8"}, sort_keys=True)]
    assert lossless["exact"] is True and lossless["ratio"] > 1.0
    assert "error" in rows[json.dumps({"entropy": "nvcomp", "mode": "quant8"}, sort_keys=True)]


def test_doctor_prints_reasons_verbatim():
    console = Console(record=True, width=200)
    console.print(doctor_table([BackendStatus("x265", False, "PyAV missing: pip install 'mesh-ray[video]'")]))
    assert "mesh-ray[video]" in console.export_text()


def test_gpu_fault_check_runs_on_cpu(tmp_path):
    # The script behind issue 10's GPU check, as a dry run: kill a stage mid-generation, same image.
    env = {**os.environ, "MESH_RAY_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "mesh_ray.bench.gpu_fault_check", "--out", str(tmp_path), "--double", "1",
                          "--single", "2", "--steps", "3", "--size", "32"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["identical"] is True and r["restarts"] == 1 and r["retries"] >= 1


# ComfyUI 0.3.64 (COMFYUI_OLD_PATH) until Mesh Split runs on 0.20 (issue 19), then COMFYUI_PATH.
@pytest.mark.comfyui_old
@pytest.mark.skipif(not os.environ.get("COMFYUI_OLD_PATH"),
                    reason="COMFYUI_OLD_PATH is not set: point it at ComfyUI 0.3.64 (CI: ../shared/comfyui)")
def test_gpu_comfy_check_runs_on_cpu(tmp_path):
    # The script behind issue 9's GPU check, as a dry run in the real ComfyUI on the CPU.
    comfy = Path(os.environ["COMFYUI_OLD_PATH"]).resolve()
    stubs = comfy.parent / "comfyui-stubs"
    env = {**os.environ, "MESH_RAY_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(stubs),
           "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    out = subprocess.run([sys.executable, "-m", "comfy_integration.gpu_check", "--comfy", str(comfy), "--out",
                          str(tmp_path), "--small", "--cpu", "--remote", "3", "--latent", "8"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["max_abs_diff"] < 1e-4 and r["split_loaded_bytes"] < r["unsplit_loaded_bytes"]


def test_transport_check_runs_on_cpu(tmp_path):
    """The GPU transport check's own path, dry on the CPU: each transport measured, exact, then a kill
    over gloo recovered exactly (on the GPU: CUDA IPC).  It starts and stops a Ray of its own."""
    import ray

    from mesh_ray.bench.gpu_checks import check_transport

    ray.shutdown()
    r = check_transport(tmp_path, "object,gloo", double=1, single=1, repeats=1, hidden=64, heads=2, image_tokens=16,
                        txt_tokens=8, steps=2)
    assert set(r["summary"]) == {"object", "gloo"}
    assert all(s["max_abs_diff"] == 0.0 for s in r["summary"].values())
    assert r["summary"]["gloo"]["hops"] == ["caller->stage0:object", "stage0->stage1:gloo", "stage1->caller:object"]
    assert r["fault"]["identical"] and r["fault"]["restarts"] == 1
    assert [h["transport"] for h in r["fault"]["hops"]] == ["object", "gloo", "object"]
