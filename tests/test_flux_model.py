"""FLUX.1 / FLUX.2 model: presets, meta construction, composable forward pieces, block replacement, shape errors."""

import psutil
import pytest
import torch

from mesh_ray.errors import ConfigError
from mesh_ray.models.flux import PRESETS, build, pack_latent, position_ids, preset, random_state_dict, unpack_tokens

from helpers import inputs


def tiny(arch, seed=0):
    cfg = PRESETS[f"tiny-{arch}"]
    model = build(cfg, "meta")
    model.load_state_dict(random_state_dict(cfg, seed), assign=True, strict=True)
    return model



def test_presets_have_the_released_sizes():
    assert PRESETS["flux1-dev"].hidden_size == 3072 and PRESETS["flux1-dev"].num_blocks == 57
    assert not PRESETS["flux1-schnell"].guidance_embed
    k4, k9, dev = PRESETS["flux2-klein-4b"], PRESETS["flux2-klein-9b"], PRESETS["flux2-dev"]
    assert (k4.depth, k4.depth_single_blocks, k4.hidden_size) == (5, 20, 3072)
    assert (k9.depth, k9.depth_single_blocks, k9.hidden_size) == (8, 24, 4096)
    assert (dev.depth, dev.depth_single_blocks, dev.hidden_size, dev.axes_dim) == (8, 48, 6144, [32, 32, 32, 32])


def test_unknown_preset_is_one_line():
    with pytest.raises(ConfigError, match="unknown preset 'flux3': use one of flux1-dev"):
        preset("flux3")


@pytest.mark.parametrize("name", ["flux1-dev", "flux2-dev"])
def test_building_a_large_model_on_meta_costs_no_memory(name):
    proc = psutil.Process()
    before = proc.memory_info().rss
    model = build(PRESETS[name], "meta", torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 10e9  # 12B / 32B parameters
    assert proc.memory_info().rss - before < 64 * 2**20


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
def test_forward_pieces_compose_to_the_forward(arch):
    model = tiny(arch)
    args = inputs(model.config)
    with torch.inference_mode():
        ref = model(*args)
        state, cond, pe = model.embed(*args)
        for start, stop in [(0, 1), (1, 3), (3, model.num_blocks)]:  # crosses the double/single boundary
            state = model.run_blocks(state, cond, pe, start, stop)
        out = model.finish(state, cond)
    assert ref.shape == (2, 24, model.config.in_channels)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
def test_block_replacement_by_key(arch):
    model = tiny(arch)
    args = inputs(model.config)
    seen = []

    def wrap(args, extra):
        seen.append(args["img"].shape)
        return extra["original_block"](args)

    replace = {("double_block", 1): wrap, ("single_block", 0): wrap}
    with torch.inference_mode():
        ref = model(*args)
        out = model(*args, transformer_options={"patches_replace": {"dit": replace}})
        skipped = model(*args, transformer_options={"patches_replace": {"dit": {
            ("single_block", 2): lambda a, e: {"img": a["img"]}}}})
    assert torch.equal(out, ref) and len(seen) == 2
    assert not torch.equal(skipped, ref)


@pytest.mark.parametrize("bad, match", [
    ({"img": torch.randn(2, 24, 7)}, r"img \(latent tokens\) has shape \(2, 24, 7\) but this flux1 model expects \[B, L, 64\]"),
    ({"txt": torch.randn(2, 5, 3)}, r"txt \(text embeddings\) has shape"),
    ({"img_ids": torch.zeros(2, 24, 4)}, r"img_ids has shape \(2, 24, 4\) .* expects \[2, 24, 3\]"),
    ({"y": None}, r"y \(pooled text vector\)"),
    ({"guidance": None}, r"guidance-distilled"),
])
def test_wrong_shapes_are_one_line_errors(bad, match):
    model = tiny("flux1")
    names = ["img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance"]
    kw = dict(zip(names, inputs(model.config)))
    kw.update(bad)
    with pytest.raises(ConfigError, match=match) as e:
        model(**kw)
    assert "\n" not in str(e.value)


def test_pack_unpack_roundtrip_and_odd_sizes():
    lat = torch.randn(1, 16, 8, 12)
    assert torch.equal(unpack_tokens(pack_latent(lat), 8, 12), lat)
    with pytest.raises(ConfigError, match="divisible by 16"):
        pack_latent(torch.randn(1, 16, 7, 8))
