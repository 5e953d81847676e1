"""The split forward on real Ray: bit-exact with the local forward (fp32 CPU), shard shipping, errors."""

import pytest
import ray
import torch

from mesh_ray.errors import ConfigError, StageError

from helpers import inputs, local_model


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
def test_raw_split_equals_local_bit_for_bit(mesh, tiny_ckpts, arch):
    path = tiny_ckpts[arch]
    model = local_model(path)
    args = inputs(model.config)
    with torch.inference_mode():
        ref = model(*args)
    layouts = {1: 1, 2: 2, 3: ["double:0-1", "single:0-1", "single:2-3"]}
    for n, stages in layouts.items():
        split = mesh.split(str(path), stages=stages)
        out1 = split(*args)
        out2 = split(*args)  # second step: pe and text tokens come from the stage caches
        assert torch.equal(out1, ref), f"{n} stages"
        assert torch.equal(out2, ref), f"{n} stages, cached constants"
        assert split.last.hops == n + 1
        split.close()


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
@pytest.mark.parametrize("remote", [4, 5, 1])  # 4: exactly the single blocks; 5: from the last double block
def test_n_blocks_remote_at_the_double_single_boundary(mesh, tiny_ckpts, arch, remote):
    path = tiny_ckpts[arch]
    model = local_model(path)
    args = inputs(model.config)
    with torch.inference_mode():
        ref = model(*args)
    split = mesh.split(str(path), n_blocks_remote=remote)
    assert [s.spec.local for s in split.stages] == [True, False]
    assert torch.equal(split(*args), ref)
    # The same remote range through ComfyUI-style block replacement of a full local model.
    with torch.inference_mode():
        patched = model(*args, transformer_options={"patches_replace": {"dit": split.block_patches()}})
    assert torch.equal(patched, ref)
    split.close()


def test_micro_batches_overlap_and_match_per_micro_batch(mesh, tiny_ckpts):
    path = tiny_ckpts["flux1"]
    model = local_model(path)
    args = inputs(model.config, b=4)
    with torch.inference_mode():
        ref = torch.cat([model(*[a[i:i + 2] for a in args]) for i in (0, 2)])
    split = mesh.split(str(path), stages=2, micro_batches=2)
    assert torch.equal(split(*args), ref)
    split.close()


def test_shard_shipped_once_then_cached(mesh, tiny_ckpts, tmp_path):
    path = tiny_ckpts["flux2"]
    model = local_model(path)
    args = inputs(model.config)
    with torch.inference_mode():
        ref = model(*args)
    stages = [{"blocks": "double:0-single:1", "checkpoint_path": "/nonexistent/on/this/worker.safetensors"},
              {"blocks": "single:2-3"}]
    first = mesh.split(str(path), stages=stages, cache_dir=str(tmp_path))
    assert [i["shard_source"] for i in first.stage_info()] == ["object_store", "file"]
    assert torch.equal(first(*args), ref)
    first.close()
    second = mesh.split(str(path), stages=stages, cache_dir=str(tmp_path))
    assert second.stage_info()[0]["shard_source"] == "cache"
    assert torch.equal(second(*args), ref)
    second.close()
    with pytest.raises(StageError, match="cannot read /nonexistent/on/this/worker.safetensors on its node and ship='never'"):
        mesh.split(str(path), stages=stages, ship="never")


def test_bad_split_inputs_are_one_line_errors(mesh, tiny_ckpts):
    path = str(tiny_ckpts["flux1"])
    with pytest.raises(ConfigError, match="stage 1 block range single:2-9 runs past the model \\(4 single blocks\\): use single:2-3"):
        mesh.split(path, stages=["double:0-single:1", "single:2-9"])
    with pytest.raises(ConfigError, match="overlaps stage 0"):
        mesh.split(path, stages=["double:0-single:1", "single:1-3"])
    with pytest.raises(ConfigError, match="leaves a gap"):
        mesh.split(path, stages=["double:0-1", "single:1-3"])
    with pytest.raises(ConfigError, match="unknown option 'colour' for SplitOptions"):
        mesh.split(path, colour="red")
    with pytest.raises(ConfigError, match="n_blocks_remote=9 but the model has 6 blocks"):
        mesh.split(path, n_blocks_remote=9)
    split = mesh.split(path, stages=2)
    img, img_ids, txt, txt_ids, t, y, g = inputs(split.config)
    with pytest.raises(ConfigError, match="txt \\(text embeddings\\) has shape"):
        split(img, img_ids, txt[..., :7], txt_ids, t, y, g)
    split.close()


def test_dead_stage_fails_fast_with_a_clear_error(mesh, tiny_ckpts):
    split = mesh.split(str(tiny_ckpts["flux1"]), stages=2, step_timeout_s=60)
    args = inputs(split.config)
    split(*args)
    ray.kill(split.stages[1].actor)  # killed for good (no_restart=True): no restart can bring it back
    with pytest.raises(StageError, match=r"stage 1 \(single:1-3\) died and cannot come back .* create the split again"):
        split(*args)
    split.close()


def test_status_lists_stage_actors(mesh, tiny_ckpts):
    split = mesh.split(str(tiny_ckpts["flux2"]), stages=2)
    actors = [a for a in mesh.status()["actors"] if a["name"].startswith(f"mesh-ray/{split.id}/")]
    assert sorted(a["blocks"] for a in actors) == ["double:0-single:0", "single:1-3"]
    assert all(a["loaded"] and a["weight_bytes"] > 0 and a["node_ip"] for a in actors)
    split.close()


def test_micro_batches_run_on_stages_at_the_same_time(mesh, tiny_ckpts):
    split = mesh.split(str(tiny_ckpts["flux2"]), stages=2, micro_batches=4, torch_threads=1)
    args = inputs(split.config, b=4, h=24, w=24)  # enough tokens that a stage call takes a while
    split(*args)
    first, second = (i["recent_calls"] for i in split.stage_info())
    assert len(first) == len(second) == 4
    overlaps = [(a, b) for a in first for b in second if a[0] < b[1] and b[0] < a[1]]
    assert overlaps, "stage 1 never worked while stage 0 did: micro-batches did not pipeline"
    split.close()
