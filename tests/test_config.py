"""Options from keyword arguments, MESH_RAY_* environment variables and YAML/JSON files."""

import pytest

from mesh_ray.config import SplitOptions, load_settings
from mesh_ray.errors import ConfigError


def test_precedence_kwargs_over_env_over_file(tmp_path, monkeypatch):
    f = tmp_path / "split.yaml"
    f.write_text("micro_batches: 3\nplacement: spread\ncodec: {mode: hevc, qp: 24}\n")
    assert load_settings(SplitOptions, f).micro_batches == 3
    monkeypatch.setenv("MESH_RAY_MICRO_BATCHES", "2")
    opts = load_settings(SplitOptions, f)
    assert (opts.micro_batches, opts.placement, opts.codec.mode, opts.codec.qp) == (2, "spread", "hevc", 24)
    assert load_settings(SplitOptions, f, micro_batches=5).micro_batches == 5


def test_bad_sources_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_RAY_MICRO_BATCHES", "zero")
    with pytest.raises(ConfigError, match="invalid SplitOptions option 'micro_batches'") as e:
        load_settings(SplitOptions)
    assert "\n" not in str(e.value)
    monkeypatch.delenv("MESH_RAY_MICRO_BATCHES")
    bad = tmp_path / "bad.yaml"
    bad.write_text("micro_batches: [1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_settings(SplitOptions, bad)
    with pytest.raises(ConfigError, match="settings file .* not found"):
        load_settings(SplitOptions, tmp_path / "missing.yaml")
    other = tmp_path / "other.json"
    other.write_text('{"colour": "red"}')
    with pytest.raises(ConfigError, match="unknown option 'colour' for SplitOptions"):
        load_settings(SplitOptions, other)


def test_split_reads_environment_and_file(mesh, tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_RAY_MICRO_BATCHES", "2")
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=1)
    assert split.options.micro_batches == 2
    split.close()
    f = tmp_path / "split.json"
    f.write_text('{"codec": "quant8", "micro_batches": 1}')
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=1, options=str(f))
    assert (split.options.codec.mode, split.options.micro_batches) == ("quant8", 2)  # env beats the file
    split.close()
