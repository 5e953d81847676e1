"""FLUX VAE decoder: key layout, inspection, slim loading, latent handling, tiling, errors (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from mesh_ray.models.images import save_images
from mesh_ray.errors import CheckpointError, ConfigError, MeshError
from mesh_ray.models.flux import pack_latent
from mesh_ray.models.vae import (TILED_TOLERANCE, VAE_PRESETS, VaeConfig, build_vae, inspect_vae, load_vae,
                                 load_vae_state, random_vae_state_dict, write_random_vae)


def _latent(channels: int, h: int, w: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, channels, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    return {arch: load_vae(write_random_vae(d / f"tiny-{arch}.safetensors", f"tiny-{arch}", seed=3))
            for arch in ("flux1", "flux2")}


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and ":" in msg, msg
    return msg


def test_real_presets_have_the_bfl_layout():
    for arch in ("flux1", "flux2"):
        keys = build_vae(VAE_PRESETS[arch], "meta").state_dict()
        params = sum(t.numel() for k, t in keys.items() if not k.startswith("bn."))
        assert 49e6 < params < 50e6  # ~49.5 M decoder parameters, as in ae.safetensors
        assert tuple(keys["decoder.conv_in.weight"].shape) == (512, VAE_PRESETS[arch].z_channels, 3, 3)
        assert tuple(keys["decoder.up.0.block.2.conv2.weight"].shape) == (128, 128, 3, 3)
        assert tuple(keys["decoder.up.1.block.0.nin_shortcut.weight"].shape) == (256, 512, 1, 1)
        assert tuple(keys["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
        assert "decoder.mid.attn_1.proj_out.weight" in keys and "decoder.up.3.upsample.conv.weight" in keys
        assert "decoder.up.0.upsample.conv.weight" not in keys
        assert tuple(keys["decoder.conv_out.weight"].shape) == (3, 128, 3, 3)
    assert "decoder.post_quant_conv.weight" not in build_vae(VAE_PRESETS["flux1"], "meta").state_dict()
    f2 = build_vae(VAE_PRESETS["flux2"], "meta").state_dict()
    assert tuple(f2["decoder.post_quant_conv.weight"].shape) == (32, 32, 1, 1)
    assert tuple(f2["bn.running_mean"].shape) == (128,) and tuple(f2["bn.running_var"].shape) == (128,)
    assert VAE_PRESETS["flux1"].latent_channels == 16 and VAE_PRESETS["flux2"].latent_channels == 128


def test_inspect_infers_config_and_slim_load_reads_only_decoder(tmp_path):
    # A ComfyUI-style bundle: prefixed keys, an encoder next to the decoder, no embedded config.
    cfg = VaeConfig(arch="flux2", z_channels=32, post_quant_conv=True, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1)
    state = {f"first_stage_model.{k}": v for k, v in random_vae_state_dict(cfg, seed=1).items()}
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    state["first_stage_model.encoder.quant_conv.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bundle.safetensors"
    save_file(state, str(path))
    info = inspect_vae(path)
    assert info.config == cfg and info.arch == "flux2" and info.prefix == "first_stage_model."
    assert info.has_encoder and info.preset is None
    assert info.decoder_bytes == sum(t.numel() * t.element_size() for k, t in state.items() if ".encoder." not in k)
    loaded = load_vae_state(path, info)
    assert loaded and all(k.startswith(("decoder.", "bn.")) for k in loaded)
    model = load_vae(path)
    assert torch.equal(model.decoder.conv_in.weight, state["first_stage_model.decoder.conv_in.weight"])
    assert torch.equal(model.bn.running_var, state["first_stage_model.bn.running_var"])


def test_random_vae_files_round_trip(tmp_path):
    for name in ("tiny-flux1", "tiny-flux2"):
        path = write_random_vae(tmp_path / f"{name}.safetensors", name, seed=5)
        info = inspect_vae(path)
        assert info.preset == name and not info.has_encoder
        a, b = random_vae_state_dict(VAE_PRESETS[name], seed=5), load_vae_state(path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_decode_shapes_and_latent_conventions(vaes):
    f1, f2 = vaes["flux1"], vaes["flux2"]
    img = f1.decode(_latent(16, 6, 10, b=2))
    assert img.shape == (2, 48, 80, 3) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    # FLUX.1: the sampler latent is un-scaled inside: z / 0.3611 + 0.1159.
    lat = _latent(16, 4, 4)
    assert torch.allclose(f1.decode(lat), f1.decode(lat / 0.3611 + 0.1159, raw=True), atol=1e-6)
    # FLUX.2: [B, 128, h, w] patchified latent -> 16x pixels; the 32-channel un-patchified form is the same.
    lat32 = _latent(32, 8, 6)
    lat128 = pack_latent(lat32).transpose(1, 2).reshape(1, 128, 4, 3)
    out = f2.decode(lat128)
    assert out.shape == (1, 64, 48, 3)
    assert torch.allclose(out, f2.decode(lat32), atol=1e-6)
    # ... and its batch-norm statistics are inverted before the decoder.
    std = torch.sqrt(f2.bn.running_var + 1e-4).view(1, -1, 1, 1)
    raw = lat128 * std + f2.bn.running_mean.view(1, -1, 1, 1)
    assert torch.allclose(out, f2.decode(raw, raw=True), atol=1e-5)


@pytest.mark.parametrize("arch", ["flux1", "flux2"])
def test_tiled_matches_full_within_stated_tolerance(vaes, arch):
    model = vaes[arch]
    c = model.config.latent_channels
    h, w = (24, 32) if arch == "flux1" else (12, 16)  # 192 x 256 pixels either way
    for seed in (0, 1):
        lat = _latent(c, h, w, seed=seed)
        full = model.decode(lat)
        tiled = model.decode(lat, tile=128, overlap=TILED_TOLERANCE["min_overlap_px"])
        assert tiled.shape == full.shape
        diff = (tiled - full).abs()
        assert diff.mean() <= TILED_TOLERANCE["mean_abs"], diff.mean()
        assert diff.max() <= TILED_TOLERANCE["max_abs"], diff.max()
        # A tile that covers the image is exactly the full decode.
        assert torch.equal(model.decode(lat, tile=256, overlap=64), full)


def test_one_line_errors(vaes, tiny_ckpts, tmp_path):
    f1, f2 = vaes["flux1"], vaes["flux2"]
    with pytest.raises(ConfigError) as e:
        f1.decode(_latent(16, 4, 4)[0])
    assert "rank 3" in one_line(e) and "latent[None]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        f1.decode(_latent(4, 4, 4))
    assert "4 channels" in one_line(e) and "16" in str(e.value)
    with pytest.raises(ConfigError) as e:
        f2.decode(_latent(16, 4, 4))
    assert "16 channels" in one_line(e) and "128" in str(e.value)
    with pytest.raises(ConfigError) as e:
        f1.decode(_latent(16, 8, 8), tile=100, overlap=16)
    assert "multiples of 8" in one_line(e)
    with pytest.raises(ConfigError) as e:
        f1.decode(_latent(16, 8, 8), tile=64, overlap=48)
    one_line(e)
    # A diffusion-model checkpoint is not a VAE.
    with pytest.raises(CheckpointError) as e:
        inspect_vae(tiny_ckpts["flux1"])
    assert "no VAE decoder tensors" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_vae(tmp_path / "missing.safetensors")
    assert "not found" in one_line(e)
    trunc = tmp_path / "trunc.safetensors"
    good = write_random_vae(tmp_path / "good.safetensors", "tiny-flux1")
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_vae(trunc)
    one_line(e)


def test_save_images_keeps_earlier_images_when_one_fails(tmp_path):
    images = torch.rand(3, 8, 8, 3)
    (tmp_path / "shot_01.png").mkdir()  # image 1 cannot be renamed onto a directory
    with pytest.raises(MeshError) as e:
        save_images(images, tmp_path / "shot.png", {"prompt": "x"})
    msg = one_line(e)
    assert "image 1 of 3" in msg and "shot_00.png" in msg
    assert (tmp_path / "shot_00.png").is_file() and not (tmp_path / "shot_02.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert math.isclose(len(list(tmp_path.iterdir())), 2)
