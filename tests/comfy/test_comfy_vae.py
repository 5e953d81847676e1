"""MeshVAEDecode (mesh-ray's FLUX decoder, vae_name) / MeshSavePromisedImage in each real ComfyUI (0.20, 0.3.64):
promise, wait, forget, errors."""

from __future__ import annotations

import json

import comfy_host as h

PROMPT = {"9": {"class_type": "MeshSavePromisedImage", "inputs": {"filename_prefix": "promised"}}}
EXTRA = {"workflow": {"nodes": [{"id": 9, "type": "MeshSavePromisedImage"}], "version": 0.4}}


def _decode(**inputs):
    """MeshVAEDecode's outputs: image, promise, audio (it returns ComfyUI's {"ui", "result"} form)."""
    return h.run_node("MeshVAEDecode", **inputs)["result"]


def _vae(name: str, seed: int = 11) -> str:
    """A tiny FLUX.1 VAE (seeded random, real safetensors) in ComfyUI's vae folder."""
    import folder_paths

    from mesh_ray.models.vae import write_random_vae

    write_random_vae(f"{folder_paths.get_folder_paths('vae')[0]}/{name}", "tiny-flux1", seed=seed)
    return name


def _latent(size: int, seed: int = 0):
    import torch

    return torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(seed))


def _wait_for(path_glob: str, timeout: float = 180.0) -> list[str]:
    import glob
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(glob.glob(path_glob))
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"nothing matched {path_glob} within {timeout:g} s")


def _png(path: str) -> tuple[dict, "object"]:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text), np.asarray(im.convert("RGB"))


def _decoded_here(name: str, latent):
    """What the same VAE gives when decoded in this process, as the uint8 a PNG holds."""
    import folder_paths

    from mesh_ray.models.images import to_uint8
    from mesh_ray.models.vae import load_vae

    return to_uint8(load_vae(folder_paths.get_full_path("vae", name)).decode(latent, raw=True))[0]


def _promise_then_save():
    import os

    import folder_paths

    import mesh_ray

    name = _vae("promise-vae.safetensors")
    latent = _latent(48)
    out = folder_paths.get_output_directory()
    preview, promised, _ = _decode(samples={"samples": latent}, mesh=mesh_ray.connect(),
                                vae_name=name, mode="promise", replicas=1, idle_timeout_s=0.0)
    ui = h.run_node("MeshSavePromisedImage", promise=promised, filename_prefix="promised/img", prompt=PROMPT,
                    extra_pnginfo=EXTRA, unique_id="9")
    existed_at_return = os.listdir(os.path.join(out, "promised")) if os.path.isdir(os.path.join(out, "promised")) else []
    (path,) = _wait_for(os.path.join(out, "promised", "img_*_.png"))
    text, pixels = _png(path)
    expected = _decoded_here(name, latent)
    return {"existed_at_return": existed_at_return, "path": os.path.relpath(path, out), "text": text,
            "max_diff": int(abs(pixels.astype(int) - expected.astype(int)).max()), "preview": tuple(preview.shape),
            "size": (promised.width, promised.height), "ui": ui["ui"]["text"][0]}


def test_promise_returns_before_the_png_exists_and_the_png_has_comfy_metadata(comfy_each):
    got = comfy_each(_promise_then_save)
    assert got["existed_at_return"] == []
    assert got["path"] == "promised/img_00001_.png"
    assert json.loads(got["text"]["prompt"]) == PROMPT
    assert json.loads(got["text"]["workflow"]) == EXTRA["workflow"]
    assert got["max_diff"] <= 1  # the same decoder weights; rounding to uint8 may differ by one step
    assert got["preview"] == (1, 384, 384, 3) and got["size"] == (384, 384)
    assert "img_00001_.png" in got["ui"]


def _wait_mode():
    import torch

    import mesh_ray
    from mesh_ray.models.images import to_uint8

    name = _vae("wait-vae.safetensors", seed=3)
    latent = _latent(8, seed=4)
    images, promised, _ = _decode(samples={"samples": latent}, mesh=mesh_ray.connect(),
                               vae_name=name, mode="wait", replicas=1, idle_timeout_s=0.0)
    again = promised.promise.result(60)
    return (tuple(images.shape), bool(torch.equal(images, again)),
            int(abs(to_uint8(images)[0].astype(int) - _decoded_here(name, latent).astype(int)).max()))


def test_wait_mode_returns_the_decoded_image(comfy_each):
    shape, promise_same, max_diff = comfy_each(_wait_mode)
    assert shape == (1, 64, 64, 3) and promise_same and max_diff <= 1


def _forget_mode():
    import os

    import folder_paths

    import mesh_ray

    name = _vae("forget-vae.safetensors", seed=5)
    out = folder_paths.get_output_directory()
    ran = h.run_node("MeshVAEDecode", samples={"samples": _latent(8, seed=6)}, mesh=mesh_ray.connect(),
                     vae_name=name, mode="forget", replicas=1, idle_timeout_s=0.0, filename_prefix="forgotten/run",
                     prompt=PROMPT, extra_pnginfo=EXTRA)
    _, promised, _ = ran["result"]
    (path,) = _wait_for(os.path.join(out, "forgotten", "run_*_00.png"))
    text, _ = _png(path)
    try:
        h.run_node("MeshSavePromisedImage", promise=promised, filename_prefix="x")
        no_promise_error = None
    except Exception as e:  # noqa: BLE001 - the node error ComfyUI would show
        no_promise_error = f"{type(e).__name__}: {e}"
    return os.path.dirname(path) == os.path.join(out, "forgotten"), text, no_promise_error, ran["ui"]["text"][0], out


def test_forget_mode_writes_into_the_output_folder(comfy_each):
    in_output, text, no_promise_error, note, out = comfy_each(_forget_mode)
    assert in_output
    assert note.startswith("forget: the decoder writes forgotten/run_") and note.endswith(f"_NN.png into {out} on this machine")
    assert json.loads(text["prompt"]) == PROMPT and json.loads(text["workflow"]) == EXTRA["workflow"]
    assert no_promise_error.startswith("ConfigError: Mesh Save Promised Image got no promise")
    assert "\n" not in no_promise_error


def _missing_vae():
    import mesh_ray

    cls = h.node_class("MeshVAEDecode")
    validation = cls.VALIDATE_INPUTS("no-such-vae.safetensors")
    try:
        _decode(samples={"samples": _latent(8)}, mesh=mesh_ray.connect(),
                vae_name="no-such-vae.safetensors", mode="wait", replicas=1, idle_timeout_s=0.0)
        raised = None
    except Exception as e:  # noqa: BLE001
        raised = f"{type(e).__name__}: {e}"
    return validation, raised


def test_missing_vae_file_is_a_one_line_node_error(comfy_each):
    validation, raised = comfy_each(_missing_vae)
    assert validation.startswith("VAE file 'no-such-vae.safetensors' is not in ComfyUI's vae folder (")
    assert "put the FLUX ae.safetensors there or pick another vae_name" in validation
    assert raised == f"ConfigError: {validation}"
    assert "\n" not in validation
