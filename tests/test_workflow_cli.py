"""``mesh-ray run / serve / bench release`` end to end through typer, on the test's local Ray."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mesh_ray.cli import app
from mesh_ray.workflow import TESTING_NODES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _app() -> typer.Typer:
    return app


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _documented_runs() -> list[list[str]]:
    """Every `mesh-ray run examples/...` command line in the README and docs/workflow.md, as arguments."""
    found: dict[str, None] = {}
    for doc in (ROOT / "README.md", ROOT / "docs" / "workflow.md"):
        for m in re.finditer(r"^mesh-ray (run examples/\S+\.json[^#\n]*)", doc.read_text(), flags=re.M):
            found[" ".join(m.group(1).split())] = None
    return [shlex.split(cmd) for cmd in found]


def test_every_example_has_a_documented_command():
    documented = {args[1] for args in _documented_runs()}
    assert documented == {f"examples/{p.name}" for p in EXAMPLES.glob("*.json")}


@pytest.mark.parametrize("args", _documented_runs(), ids=" ".join)
def test_documented_example_commands_run(args, ray_local, tmp_path, monkeypatch):
    """Each example runs with the very command the README / docs give (outputs go to a scratch directory).
    flux_tiny_vae: split DiT -> sampler -> VAE decode wait / promise / forget -> saved PNGs."""
    monkeypatch.chdir(tmp_path)
    example = args[1]
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    res = CliRunner().invoke(_app(), [*args, *([] if "--json" in args else ["--json"])])
    assert res.exit_code == 0, res.output
    out = _last_json(res.stdout)
    assert out["status"] == "finished"
    assert out["release_level"] == (int(args[args.index("--release-level") + 1]) if "--release-level" in args else 0)
    if example == "examples/flux_tiny_vae.json":
        assert Path(out["outputs"]["7"][0][0]).is_file()  # wait + SaveImage
        assert Path(out["outputs"]["9"][0][0]).is_file()  # promise + SavePromisedImage
        assert list((tmp_path / "outputs" / "vae").glob("tiny_vae_forget_*.png"))  # forget: the replica wrote it
    if example == "examples/expand_rerun.json":
        assert out["reexecuted"] == (["1"] if out["release_level"] == 2 else [])  # released, then needed


def test_run_reports_errors_in_one_line(ray_local, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"class_type": "Nope", "inputs": {}}}))
    res = CliRunner().invoke(_app(), ["run", str(bad), "--json"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: node '1' has unknown class_type 'Nope'")


def test_run_without_nodes_names_the_option_and_refuses_other_modules(ray_local):
    runner = CliRunner()
    res = runner.invoke(_app(), ["run", str(EXAMPLES / "release_scenario.json"), "--json"])
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [
        f"error: node '1' has unknown class_type 'AllocateMemory': it is a node type of module {TESTING_NODES}, which "
        f"this run does not load: pass --nodes {TESTING_NODES} (node_modules=[{TESTING_NODES!r}] in Python)"]
    res = runner.invoke(_app(), ["run", str(EXAMPLES / "release_scenario.json"), "--nodes", "os", "--json"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: node module 'os' is not allowed (allowed: mesh_ray.): ")


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
