"""A model loaded by ComfyUI's own UNETLoader from a file on disk: the stages read only their blocks
from that file (slim stages; ``shard_source == "file"``), fp8 weights stay fp8 on the stage, and
the split equals the unsplit run bit for bit; a stage's memory is its blocks' bytes plus an overhead."""

from __future__ import annotations

import pytest

import comfy_host as h

PLAN = "double:1-single:0; single:1 local"  # the file's FLUX.2 has 2 double + 2 single blocks


def _from_file(quant: str | None, weight_dtype: str):
    import os

    import folder_paths
    import nodes

    from comfy_integration import tiny

    name = f"mesh-flux2-{quant or 'bf16'}.safetensors"
    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], name)
    tiny.write_tiny("flux2", path, quant=quant)
    model, = nodes.UNETLoader().load_unet(name, weight_dtype)
    ref = tiny.sample(model, "flux2")
    mesh, = h.run_node("MeshConnect", address="")
    split, = h.run_node("MeshSplitModel", model=model, mesh=mesh, n_blocks_remote=0, stages=PLAN, codec_mode="raw",
                        unique_id=f"file-{quant}")
    out = tiny.sample(split, "flux2")
    remote = h.remote_of(split)
    info = remote.group.info()
    import comfy.model_management as mm

    dm = model.model.diffusion_model
    local_bytes = mm.module_size(dm.double_blocks[1]) + mm.module_size(dm.single_blocks[0])
    qkv = dm.double_blocks[1].img_attn.qkv.weight
    remote.close()
    return {"diff": tiny.max_diff(out, ref), "scale": tiny.max_diff(ref, ref * 0), "sources": [s["shard_source"] for s in info],
            "stage_bytes": sum(s["weight_bytes"] for s in info), "comfy_bytes": int(local_bytes),
            "checkpoint": remote.checkpoint == path, "config": type(model.model.model_config).__name__,
            "weight": f"{type(qkv).__name__}/{getattr(qkv, '_qdata', qkv).dtype}",
            "ops": type(dm.double_blocks[1].img_attn.qkv).__qualname__}


@pytest.mark.parametrize("quant,weight_dtype", [(None, "default"), ("fp8", "fp8_e4m3fn"), ("scaled_fp8", "default")])
def test_unetloader_file_split_reads_the_file_and_equals_unsplit(comfy, quant, weight_dtype):
    got = comfy(_from_file, quant, weight_dtype)
    assert got["config"] == "Flux2" and got["checkpoint"], got  # ComfyUI's own detection, our stages on its file
    assert got["sources"] == ["file"], got  # the stage read its own blocks from the user's file
    assert got["diff"] == 0.0 and got["scale"] > 0.01, got
    assert got["stage_bytes"] == got["comfy_bytes"], got  # the same tensors, in the same dtypes (fp8 stays fp8)
    if quant:
        assert "float8_e4m3fn" in got["weight"], got


def _from_checkpoint():
    import os

    import folder_paths
    import nodes

    from comfy_integration import tiny

    name = "mesh-flux2-all-in-one.safetensors"
    path = os.path.join(folder_paths.get_folder_paths("checkpoints")[0], name)
    tiny.write_tiny("flux2", path, prefix="model.diffusion_model.")  # a checkpoint's layout (no CLIP/VAE here)
    folder_paths.filename_list_cache.clear()
    model = nodes.CheckpointLoaderSimple().load_checkpoint(name)[0]  # the Load Checkpoint node's own code
    ref = tiny.sample(model, "flux2")
    mesh, = h.run_node("MeshConnect", address="")
    split, = h.run_node("MeshSplitModel", model=model, mesh=mesh, n_blocks_remote=0, stages=PLAN, codec_mode="raw",
                        unique_id="checkpoint")
    out = tiny.sample(split, "flux2")
    remote = h.remote_of(split)
    info = remote.group.info()
    remote.close()
    return {"diff": tiny.max_diff(out, ref), "scale": tiny.max_diff(ref, ref * 0), "checkpoint": remote.checkpoint == path,
            "prefix": remote.spec.file_prefix, "sources": [s["shard_source"] for s in info],
            "config": type(model.model.model_config).__name__}


def test_load_checkpoint_file_split_reads_its_blocks_under_the_checkpoint_prefix(comfy):
    got = comfy(_from_checkpoint)
    assert got["config"] == "Flux2" and got["checkpoint"] and got["prefix"] == "model.diffusion_model.", got
    assert got["sources"] == ["file"], got  # the stage read its blocks from the all-in-one file
    assert got["diff"] == 0.0 and got["scale"] > 0.01, got


def _stage_memory(hidden: int):
    import os

    import folder_paths
    import ray

    from comfy_integration import tiny
    from comfy_integration.comfy_env import ComfySource
    from comfy_integration.comfy_stage import ComfyBlocks
    from comfy_integration.split_clone import model_spec
    from comfy_integration.archs import BY_NAME
    from mesh_ray.actors.stage import StageActor, StageInit

    name = f"mesh-flux2-mem-{hidden}.safetensors"
    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], name)
    heads = hidden // 128
    tiny.write_tiny("flux2", path, hidden_size=hidden, num_heads=heads, context_in_dim=32)
    import nodes

    model, = nodes.UNETLoader().load_unet(name, "default")
    spec = model_spec(model, BY_NAME["flux2"], ComfySource.here().for_actors())
    host = ComfyBlocks(0, spec, (("double_block", 0), ("double_block", 1)), "double:0-1")
    actor = StageActor.options(num_cpus=1).remote(StageInit(index=0, host=host, checkpoint_path=path, dtype="float32",
                                                           cache_dir=folder_paths.get_temp_directory()))
    before = ray.get(actor.info.remote(), timeout=300)
    after = ray.get(actor.load_from_file.remote(), timeout=300)
    ray.kill(actor)
    return {"file_bytes": os.path.getsize(path), "model_bytes": model.model_size(), "weight_bytes": after["weight_bytes"],
            "rss_before": before["rss_bytes"], "rss_after": after["rss_bytes"], "source": after["shard_source"]}


def test_a_stage_holds_its_blocks_bytes_plus_an_overhead(comfy):
    """Measured for docs/comfyui.md: RSS before and after loading two of four blocks from a file."""
    got = comfy(_stage_memory, 1024)
    grew = got["rss_after"] - got["rss_before"]
    print(f"stage memory: blocks {got['weight_bytes'] / 2**20:.1f} MiB of a {got['model_bytes'] / 2**20:.1f} MiB model "
          f"({got['file_bytes'] / 2**20:.1f} MiB file), "
          f"RSS {got['rss_before'] / 2**20:.0f} -> {got['rss_after'] / 2**20:.0f} MiB (+{grew / 2**20:.1f} MiB)")
    assert got["source"] == "file"
    assert got["weight_bytes"] < 0.7 * got["model_bytes"]  # two double blocks of four blocks: not the whole model
    assert grew < 1.25 * got["weight_bytes"] + 48 * 2**20, got  # the blocks, plus a bounded overhead
