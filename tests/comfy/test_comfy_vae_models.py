"""Mesh VAE Decode running ComfyUI's own VAE class on decoder actors, in the real ComfyUI and real Ray.

The small VAEs are built through ComfyUI's classes (``comfy_integration.small_vaes``); the LTX video
VAE goes through ``VAELoader`` from a safetensors file (ComfyUI's detection reads its config from
the metadata) and the LTX audio VAE through ``LTXVAudioVAELoader``.  References are ComfyUI's own
nodes run in the same ComfyUI process: ``VAEDecode``, ``VAEDecodeTiled``, ``LTXVAudioVAEDecode``.
Everything runs on the CPU, where the decoders must give the same bits (max abs diff 0), in fp32 and
(FLUX.2) bf16.  ComfyUI 0.20 (``comfy``); the FLUX.1 case on 0.3.64 too (``comfy_old``): the LTX VAEs and
AV latents are 0.20's.
"""

from __future__ import annotations

import pytest

import comfy_host as h

VAE_INPUT = "(the vae input)"
LTX_VAE = "ltx-video-vae.safetensors"
LTX_AUDIO = "ltx-audio-vae.safetensors"
# Decoders that sit idle for 10 s exit (and come back on the next decode): the session's Ray has room for more tests.
BASE = dict(vae_name=VAE_INPUT, replicas=1, idle_timeout_s=10.0)


def _ltx_setup(audio: bool = False):
    """(video VAE loaded by VAELoader, audio VAE loaded by LTXVAudioVAELoader or None, the prompt that links
    them to node "9", a Mesh VAE Decode): as ComfyUI's executor would hand them over."""
    import os

    import folder_paths
    import nodes

    from comfy_integration.small_vaes import write_ltx_audio_vae, write_ltx_video_vae

    vae_dir = folder_paths.get_folder_paths("vae")[0]
    if not os.path.exists(os.path.join(vae_dir, LTX_VAE)):
        write_ltx_video_vae(os.path.join(vae_dir, LTX_VAE), seed=2)
    (vae,) = nodes.VAELoader().load_vae(LTX_VAE)
    prompt = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": LTX_VAE}},
              "9": {"class_type": "MeshVAEDecode", "inputs": {"vae": ["1", 0]}}}
    audio_vae = None
    if audio:
        from comfy_extras.nodes_lt_audio import LTXVAudioVAELoader

        ckpt = os.path.join(os.path.dirname(vae_dir), "checkpoints")
        if not os.path.exists(os.path.join(ckpt, LTX_AUDIO)):
            write_ltx_audio_vae(os.path.join(ckpt, LTX_AUDIO), seed=3)
        folder_paths.add_model_folder_path("checkpoints", ckpt, is_default=True)
        audio_vae = LTXVAudioVAELoader.execute(LTX_AUDIO)[0]
        prompt["2"] = {"class_type": "LTXVAudioVAELoader", "inputs": {"ckpt_name": LTX_AUDIO}}
        prompt["9"]["inputs"]["audio_vae"] = ["2", 0]
    return vae, audio_vae, prompt


def _has_ltx_audio() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("comfy_extras.nodes_lt_audio", "comfy.nested_tensor"))


def _need_ltx_audio(comfy) -> None:
    if not comfy(_has_ltx_audio):
        pytest.skip("this ComfyUI has no LTX 2.3 audio VAE nor AV latents (0.3.64): they need ComfyUI 0.20")


def _randn(*shape, seed: int = 0):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _comfy_decode(vae, latent, tiled: dict | None = None):
    """ComfyUI's own node on this latent, run as its executor runs nodes (inference mode)."""
    import nodes
    import torch

    with torch.inference_mode():
        if tiled:
            return nodes.VAEDecodeTiled().decode(vae, {"samples": latent}, **tiled)[0]
        return nodes.VAEDecode().decode(vae, {"samples": latent})[0]


def _diff(a, b) -> float:
    """Max abs difference, or inf when the shapes differ."""
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")


def _flux(arch: str, dtype: str | None):
    import torch

    import mesh_ray
    from comfy_integration.small_vaes import flux_vae

    vae = flux_vae(arch, seed=4, dtype=getattr(torch, dtype) if dtype else None)
    latent = _randn(1, 16, 8, 8, seed=5) if arch == "flux1" else _randn(1, 128, 4, 4, seed=5)
    ref = _comfy_decode(vae, latent)
    mesh = mesh_ray.connect()
    images, kept, audio = h.run_node("MeshVAEDecode", samples={"samples": latent}, mesh=mesh, mode="wait", vae=vae,
                                     **BASE)["result"]
    preview, promised, no_audio = h.run_node("MeshVAEDecode", samples={"samples": latent}, mesh=mesh, mode="promise",
                                             vae=vae, **BASE)["result"]
    remote = promised.promise.ref is not None  # decoded by an actor, not in this process
    got = promised.promise.result(300)
    return {"wait": _diff(images, ref), "promise": _diff(got, ref), "kept": _diff(kept.promise.result(1), ref),
            "remote": remote, "audio": (audio, no_audio), "shape": tuple(ref.shape), "std": float(ref.std()),
            "preview": tuple(preview.shape), "size": (promised.width, promised.height, promised.batch, promised.video),
            "dtype": str(vae.vae_dtype)}


@pytest.mark.parametrize("arch,dtype", [("flux1", None), ("flux2", None), ("flux2", "bfloat16")])
def test_flux_wait_and_promise_equal_comfyui_vae_decode(comfy, arch, dtype):
    got = comfy(_flux, arch, dtype)
    assert got["dtype"] == f"torch.{dtype or 'float32'}"  # the decoder computes in the dtype the VAE has here
    assert got["remote"] and got["wait"] == 0.0 and got["promise"] == 0.0 and got["kept"] == 0.0, got
    assert got["shape"] == (1, 64, 64, 3) and got["std"] > 0.05  # an image, not a flat or clipped field
    assert got["preview"] == (1, 64, 64, 3) and got["size"] == (64, 64, 1, False)
    assert got["audio"] == (None, None)


def test_flux1_vae_class_on_the_oldest_comfyui(comfy_old):
    """ComfyUI 0.3.64 (a released-size FLUX.1 VAE there: its detection fixes the decoder's width)."""
    got = comfy_old(_flux, "flux1", None)
    assert got["remote"] and got["wait"] == 0.0 and got["promise"] == 0.0 and got["kept"] == 0.0, got
    assert got["shape"] == (1, 64, 64, 3) and got["size"] == (64, 64, 1, False)


def _ltx_video():
    import mesh_ray

    vae, _, prompt = _ltx_setup()
    latent = _randn(1, 128, 3, 4, 4, seed=6)  # 3 latent frames of 4x4 -> 17 frames of 128x128
    ref = _comfy_decode(vae, latent)
    tiled = dict(tile_size=64, overlap=32, temporal_size=16, temporal_overlap=8)
    ref_tiled = _comfy_decode(vae, latent, tiled)
    mesh = mesh_ray.connect()
    run = dict(samples={"samples": latent}, mesh=mesh, vae=vae, prompt=prompt, unique_id="9", **BASE)
    images, kept, _ = h.run_node("MeshVAEDecode", mode="wait", **run)["result"]
    preview, promised, _ = h.run_node("MeshVAEDecode", mode="promise", **run)["result"]
    tiled_images, _, _ = h.run_node("MeshVAEDecode", mode="wait", **{**run, **tiled})["result"]
    return {"wait": _diff(images, ref), "promise": _diff(promised.promise.result(300), ref),
            "tiled": _diff(tiled_images, ref_tiled), "tiled_vs_plain": _diff(ref_tiled, ref),
            "shape": tuple(ref.shape), "std": float(ref.std()),
            "preview": tuple(preview.shape), "size": (promised.width, promised.height, promised.batch, promised.video)}


def test_ltx_video_from_vaeloader_equals_vae_decode_and_vae_decode_tiled(comfy):
    got = comfy(_ltx_video)
    assert got["shape"] == (17, 128, 128, 3) and got["std"] > 0.05
    assert got["wait"] == 0.0 and got["promise"] == 0.0, got
    assert got["tiled"] == 0.0 and got["tiled_vs_plain"] > 0.0, got  # ComfyUI's tiled decode, not the plain one
    assert got["preview"] == (3, 128, 128, 3)  # one preview image per latent frame while decoding
    assert got["size"] == (128, 128, 17, True)


def _read_video(path: str) -> dict:
    import av
    import numpy as np

    with av.open(path) as c:
        v = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        audio = [{"rate": a.rate, "channels": a.channels} for a in c.streams.audio]
        size, tags = (v.width, v.height), dict(c.metadata)
    samples = 0
    if audio:
        with av.open(path) as c:
            samples = sum(f.samples for f in c.decode(audio=0))
    return {"frames": len(frames), "size": size, "audio": audio, "samples": samples, "tags": tags,
            "pixels": np.stack(frames)}


def _ltx_av_and_video_file():
    import os

    import comfy.nested_tensor
    import torch

    import folder_paths
    import mesh_ray
    from comfy_extras.nodes_lt_audio import LTXVAudioVAEDecode

    vae, audio_vae, prompt = _ltx_setup(audio=True)
    video, audio = _randn(1, 128, 3, 2, 2, seed=7), _randn(1, 8, 10, 16, seed=8)
    latent = comfy.nested_tensor.NestedTensor((video, audio))
    ref = _comfy_decode(vae, latent)  # VAEDecode takes the video part of an AV latent
    with torch.inference_mode():
        ref_audio = LTXVAudioVAEDecode.execute({"samples": latent}, audio_vae)[0]
    run = dict(samples={"samples": latent}, mesh=mesh_ray.connect(), vae=vae, audio_vae=audio_vae, prompt=prompt,
               unique_id="9", **BASE)
    images, kept, got_audio = h.run_node("MeshVAEDecode", mode="wait", **run)["result"]
    _, promised, none_audio = h.run_node("MeshVAEDecode", mode="promise", **run)["result"]
    meta = {"workflow": {"nodes": [{"id": 10, "type": "MeshSavePromisedVideo"}]}}
    saver = h.node_class("MeshSavePromisedVideo")()
    ui = saver.save(promised, filename_prefix="clips/av", fps=25.0, prompt=prompt, extra_pnginfo=meta, unique_id="10")
    out = os.path.join(folder_paths.get_output_directory(), "clips")
    at_return = sorted(os.listdir(out)) if os.path.isdir(out) else []
    (path,) = [str(p) for p in saver.last_handle.result(300)]
    read = _read_video(path)
    # The same frames and audio through ComfyUI's own writer here (as Create Video + Save Video would write them)
    from fractions import Fraction

    from comfy_api.latest import InputImpl, Types

    own = os.path.join(folder_paths.get_temp_directory(), "comfy-own-av.mp4")
    InputImpl.VideoFromComponents(Types.VideoComponents(images=ref, audio=ref_audio, frame_rate=Fraction(25.0))).save_to(own)
    theirs = _read_video(own)
    return {"wait": _diff(images, ref), "audio": _diff(got_audio["waveform"], ref_audio["waveform"]),
            "rate": (got_audio["sample_rate"], ref_audio["sample_rate"]), "none_audio": none_audio,
            "promise_audio": _diff(promised.audio_dict(300)["waveform"], ref_audio["waveform"]),
            "at_return": at_return, "name": os.path.relpath(path, out), "ui": ui["ui"]["text"][0], "video": read,
            "same_as_comfy_writer": bool((read.pop("pixels") == theirs.pop("pixels")).all()),
            "comfy_writer": {k: theirs[k] for k in ("frames", "size", "audio", "samples")}, "frames": ref.shape[0]}


def test_ltx_av_latent_video_and_audio_equal_comfyui_and_the_promised_video_plays(comfy):
    import json

    _need_ltx_audio(comfy)
    got = comfy(_ltx_av_and_video_file)
    assert got["wait"] == 0.0 and got["audio"] == 0.0 and got["promise_audio"] == 0.0, got
    assert got["rate"] == (16000, 16000) and got["none_audio"] is None
    assert got["at_return"] == [] and got["name"] == "av_00001_.mp4" and "av_00001_.mp4" in got["ui"]
    v = got["video"]
    assert v["frames"] == got["frames"] == 17 and v["size"] == (64, 64)
    assert v["audio"] == [{"rate": 16000, "channels": 2}] and v["samples"] > 0
    assert json.loads(v["tags"]["workflow"]) == {"nodes": [{"id": 10, "type": "MeshSavePromisedVideo"}]}
    assert json.loads(v["tags"]["prompt"])["9"]["class_type"] == "MeshVAEDecode"
    # decoded back, the file's frames are exactly those of ComfyUI's own writer given ComfyUI's own decode
    assert got["same_as_comfy_writer"] and got["comfy_writer"] == {k: v[k] for k in ("frames", "size", "audio", "samples")}


def _forget():
    import glob
    import os
    import time

    import folder_paths
    import mesh_ray

    from mesh_ray.models.images import to_uint8

    vae, _, prompt = _ltx_setup()
    out = folder_paths.get_output_directory()
    ran = h.run_node("MeshVAEDecode", samples={"samples": _randn(1, 128, 2, 2, 2, seed=9)}, mesh=mesh_ray.connect(),
                     vae=vae, mode="forget", filename_prefix="forgot/clip", fps=12.0, prompt=prompt, unique_id="9",
                     **BASE)
    note = ran["ui"]["text"][0]
    end = time.monotonic() + 300
    while not glob.glob(os.path.join(out, "forgot", "clip_*.mp4")) and time.monotonic() < end:
        time.sleep(0.1)
    (path,) = glob.glob(os.path.join(out, "forgot", "clip_*.mp4"))
    read = _read_video(path)
    read.pop("pixels")
    from comfy_integration.small_vaes import flux_vae

    flux = flux_vae("flux2", seed=4)
    latent = _randn(1, 128, 4, 4, seed=10)
    h.run_node("MeshVAEDecode", samples={"samples": latent}, mesh=mesh_ray.connect(), vae=flux, mode="forget",
               filename_prefix="forgot/img", **BASE)
    while not glob.glob(os.path.join(out, "forgot", "img_*_00.png")) and time.monotonic() < end:
        time.sleep(0.1)
    from PIL import Image
    import numpy as np

    (png,) = glob.glob(os.path.join(out, "forgot", "img_*_00.png"))
    with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    expected = to_uint8(_comfy_decode(flux, latent))[0].astype(int)
    return {"note": note, "video": read, "png_diff": int(abs(pixels - expected).max()), "result": ran["result"][1:],
            "hidden": [p for p in os.listdir(os.path.join(out, "forgot")) if p.startswith(".")]}


def test_forget_writes_the_video_and_the_png_on_the_decoder(comfy):
    got = comfy(_forget)
    assert got["note"].startswith("forget: the decoder writes forgot/clip_") and ".mp4 into " in got["note"]
    assert got["video"]["frames"] == 9 and got["video"]["size"] == (64, 64) and got["video"]["audio"] == []
    assert got["png_diff"] == 0 and got["result"] == (None, None) and got["hidden"] == []


def _killed_decoder():
    import os
    import time

    import ray

    import mesh_ray
    from comfy_integration.vae_host import ComfyVaeHost
    from mesh_ray.errors import MeshError

    vae, _, _ = _ltx_setup()
    mesh = mesh_ray.connect()
    # The library's path to the same pool: no prompt, so the host takes the LTX config from the model itself.
    svc = mesh.vae(ComfyVaeHost(vae, LTX_VAE), replicas=2, num_cpus=0.5, torch_threads=1,
                   cache_dir=os.environ["MESH_RAY_CACHE_DIR"])
    try:
        lats = [_randn(1, 128, 5, 6, 6, seed=s) for s in range(6)]
        victim = svc.actors()[0]
        promises = [svc.decode(lat, mode="promise", timeout=600) for lat in lats]
        end = time.monotonic() + 120
        while ray.get(victim.info.remote(), timeout=30)["busy"] != 1:
            if time.monotonic() > end:
                raise AssertionError("replica 0 never started decoding")
            time.sleep(0.05)
        pending = svc.stats()["replicas"][0]["in_flight"]
        ray.kill(victim)
        diffs = [_diff(p.result(600), _comfy_decode(vae, lat)) for lat, p in zip(lats, promises)]
        svc.drain(timeout=300)
        stats = svc.stats()
        kinds = {i.get("kind") for i in svc.replica_info()}
    except MeshError as e:
        raise AssertionError(str(e)) from None
    finally:
        svc.close()
    return {"diffs": diffs, "pending": pending, "retries": stats["retries"], "failed": stats["failed"], "kinds": kinds}


def test_a_decoder_killed_with_video_work_pending_loses_nothing(comfy):
    got = comfy(_killed_decoder)
    assert got["pending"] >= 2 and got["retries"] >= got["pending"] and got["failed"] == 0, got
    assert got["diffs"] == [0.0] * 6 and got["kinds"] == {"comfyui"}


def _bad_inputs(with_audio: bool):
    import comfy.sd
    import torch

    import mesh_ray

    vae, audio_vae, prompt = _ltx_setup(audio=with_audio)
    mesh = mesh_ray.connect()
    cases = {
        "flux latent into the LTX VAE": dict(samples={"samples": _randn(1, 16, 8, 8)}, vae=vae),
        "image latent into the LTX VAE": dict(samples={"samples": _randn(1, 128, 4, 4)}, vae=vae),
        "no VAE": dict(samples={"samples": _randn(1, 16, 8, 8)}),
        "a VAE ComfyUI found nothing in": dict(samples={"samples": _randn(1, 16, 8, 8)},
                                              vae=comfy.sd.VAE(sd={"junk": torch.zeros(1)})),
        "tiles for the FLUX file decoder": dict(samples={"samples": _randn(1, 16, 8, 8)}, vae_name="x.safetensors",
                                                tile_size=256),
    }
    if with_audio:
        cases["audio VAE without an audio part"] = dict(samples={"samples": _randn(1, 128, 2, 2, 2)}, vae=vae,
                                                        audio_vae=audio_vae)
        # the audio VAE with no file to read its config from: ComfyUI cannot rebuild it on a decoder
        cases["an unsupported VAE"] = dict(samples={"samples": _randn(1, 8, 10, 16)}, vae=audio_vae)
    out = {}
    for name, inputs in cases.items():
        try:
            h.run_node("MeshVAEDecode", mesh=mesh, mode="wait", **{**BASE, **inputs})
            out[name] = None
        except Exception as e:  # noqa: BLE001 - the node error ComfyUI would show
            out[name] = f"{type(e).__name__}: {e}"
    return out


def test_bad_inputs_are_one_line_errors(comfy):
    with_audio = comfy(_has_ltx_audio)
    got = comfy(_bad_inputs, with_audio)
    for name, msg in got.items():
        assert msg is not None and "\n" not in msg, (name, msg)
    assert got["flux latent into the LTX VAE"].startswith("ConfigError: latent of shape [1, 16, 8, 8] does not fit")
    assert "which decodes [B, 128, F, h, w]: connect the VAE that matches" in got["image latent into the LTX VAE"]
    assert got["no VAE"].startswith("ConfigError: Mesh VAE Decode has no VAE: connect one to the vae input")
    assert got["a VAE ComfyUI found nothing in"].startswith("ConfigError: the VAE input is not a usable ComfyUI VAE")
    assert got["tiles for the FLUX file decoder"].startswith("ConfigError: tile_size works with a VAE on the vae input")
    if with_audio:
        assert "has no audio part" in got["audio VAE without an audio part"]
        assert got["an unsupported VAE"].startswith("ConfigError: ComfyUI cannot rebuild ComfyUI VAE AudioVAE on a "
                                                   "decoder")
        assert "so the file's metadata can travel" in got["an unsupported VAE"]
