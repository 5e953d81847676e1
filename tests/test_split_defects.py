"""Issue 14's defects on real Ray: per-stage dtype, options precedence, bounded patch cache."""

import pytest
import torch

from mesh_ray.actors.device import resolve_dtype
from mesh_ray.config import ConnectOptions, SplitOptions
from mesh_ray.errors import ConfigError
from mesh_ray.mesh import connect

from helpers import inputs, local_model


def test_one_dtype_rule_per_device():
    assert resolve_dtype(torch.device("cpu"), None) is torch.float32
    assert resolve_dtype(torch.device("cpu"), "auto") is torch.float32
    assert resolve_dtype(torch.device("cuda"), None) is torch.bfloat16
    assert resolve_dtype(torch.device("cuda"), "float16") is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        resolve_dtype(torch.device("cpu"), "fp8")


def test_each_stage_computes_in_its_own_dtype(mesh, tiny_ckpts):
    """A caller in fp32 with a bf16 stage (what a CPU driver and a GPU stage are): the stage is
    not forced to the caller's dtype, and every link says which dtype it carried."""
    path = str(tiny_ckpts["flux1"])
    model = local_model(path)
    args = inputs(model.config)
    with torch.inference_mode():
        ref = model(*args)
    split = mesh.split(path, stages=["double:0-1", {"blocks": "single:0-3", "dtype": "bfloat16"}])
    try:
        assert split.dtype is torch.float32
        assert [i["dtype"] for i in split.stage_info()] == ["float32", "bfloat16"]
        out = split(*args)
        assert out.dtype is torch.float32
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
        assert cos > 0.99 and not torch.equal(out, ref)
        assert [(t.link, t.dtype) for t in split.last.transfers] == [
            ("caller->stage0", "float32"), ("stage0->stage1", "bfloat16"), ("stage1->caller", "bfloat16")]
    finally:
        split.close()


def test_options_precedence_for_every_form(mesh, tiny_ckpts, monkeypatch):
    path = str(tiny_ckpts["flux1"])
    monkeypatch.setenv("MESH_RAY_MICRO_BATCHES", "2")
    split = mesh.split(path, stages=1, options=SplitOptions())  # an object: only its set fields count
    try:
        assert split.options.micro_batches == 2
    finally:
        split.close()
    split = mesh.split(path, stages=1, options={"micro_batches": 4, "placement": "pack"}, micro_batches=3)
    try:
        assert (split.options.micro_batches, split.options.placement) == (3, "pack")  # keyword > env > dict
    finally:
        split.close()
    monkeypatch.setenv("MESH_RAY_TIMEOUT_S", "7")
    assert connect(options=ConnectOptions(timeout_s=5)).options.timeout_s == 7
    assert connect(options={"timeout_s": 5, "namespace": "x"}, timeout_s=9).options.model_dump(
        include={"timeout_s", "namespace"}) == {"timeout_s": 9, "namespace": "x"}
    with pytest.raises(ConfigError, match="options must be a ConnectOptions"):
        connect(options=3)


def test_patch_path_cache_stays_bounded(mesh, tiny_ckpts):
    path = str(tiny_ckpts["flux2"])
    model = local_model(path)
    split = mesh.split(path, n_blocks_remote=2)
    try:
        patches = {"patches_replace": {"dit": split.block_patches()}}
        img, img_ids, txt, txt_ids, t, y, g = inputs(model.config)
        seen = 0
        for i in range(split.generations_kept + 4):  # a different txt_ids offset: a different rotary pe every call
            with torch.inference_mode():
                model(img, img_ids, txt, txt_ids + i, t, y, g, transformer_options=patches)
            seen = max(seen, split.generations_cached)
        assert seen == split.generations_kept  # filled to its bound, never past it
    finally:
        split.close()
