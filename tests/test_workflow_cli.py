"""``mesh-ray run / serve / bench release`` end to end through typer, on the test's local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from mesh_ray.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _app() -> typer.Typer:
    return app


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_run_flux_vae_example_json(ray_local, tmp_path, monkeypatch):
    """Split DiT -> sampler -> VAE decode wait / promise / forget -> saved PNGs, at release level 2."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(_app(), ["run", str(EXAMPLES / "flux_tiny_vae.json"), "--release-level", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = _last_json(res.stdout)
    assert out["status"] == "finished" and out["release_level"] == 2
    assert Path(out["outputs"]["7"][0][0]).is_file()  # wait + SaveImage
    assert Path(out["outputs"]["9"][0][0]).is_file()  # promise + SavePromisedImage
    assert list((tmp_path / "outputs" / "vae").glob("tiny_vae_forget_*.png"))  # forget: the replica wrote it


def test_run_reports_rerun_and_errors(ray_local, tmp_path):
    runner = CliRunner()
    res = runner.invoke(_app(), ["run", str(EXAMPLES / "expand_rerun.json"), "--release-level", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert _last_json(res.stdout)["reexecuted"] == ["1"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"class_type": "Nope", "inputs": {}}}))
    res = runner.invoke(_app(), ["run", str(bad), "--json"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: node '1' has unknown class_type 'Nope'")


def test_bench_release_json(ray_local):
    res = CliRunner().invoke(_app(), ["bench", "release", "--loader-mb", "4", "--heavy-mb", "8", "--json"])
    assert res.exit_code == 0, res.output
    out = _last_json(res.stdout)
    assert set(out["levels"]) == {"0", "1", "2"} and out["min_live_bytes"] > 0 and out["goal_met"]
    assert "minimum live set" in res.stdout


def test_serve_and_stop(ray_local):
    runner = CliRunner()
    res = runner.invoke(_app(), ["serve", "--json"])
    assert res.exit_code == 0, res.output
    assert _last_json(res.stdout)["kind"] == "workflow-service"
    res = runner.invoke(_app(), ["serve", "--stop", "--json"])
    assert res.exit_code == 0 and _last_json(res.stdout)["stopped"] is True
