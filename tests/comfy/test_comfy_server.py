"""A real ComfyUI server of each version (``main.py --cpu --listen 127.0.0.1``, temporary folders,
the frontend package of the ``comfy`` extra) with mesh-ray in custom_nodes: GET /mesh/status over HTTP, the web extension served, the nodes' definitions, a
promise decode through the queue (``executed`` arrives after the prompt finished, PNG with
metadata), and a missing VAE rejected by ComfyUI's validation with our one-line message."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from comfy_host import REPO, stubs_of

START_TIMEOUT_S = 300
EVENT_TIMEOUT_S = 300
VAE = "tiny-flux1.safetensors"
OUR_NODES = ("MeshConnect", "MeshSplitFlux", "MeshVAEDecode", "MeshSavePromisedImage", "MeshSavePromisedVideo",
             "MeshAutoCPUOffload")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def server(comfyui_each_dir, tmp_path_factory, request):
    import ray

    from mesh_ray.models.vae import write_random_vae

    # ComfyUI joins the tests' Ray cluster by address (the LAN topology); an embedded Ray started
    # inside the server would need Ray's fixed 30 s raylet start-up window, which an overloaded
    # test machine can miss.
    request.config.pluginmanager.get_plugin(str(REPO / "tests" / "conftest.py")).ensure_ray()
    address = ray.get_runtime_context().gcs_address

    base = tmp_path_factory.mktemp("comfy-server")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "mesh-ray").symlink_to(REPO, target_is_directory=True)
    write_random_vae(base / "models" / "vae" / VAE, "tiny-flux1", seed=3)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    # the stand-ins, and this checkout (the one custom_nodes/mesh-ray links to) before any installed copy
    env.update(PYTHONPATH=os.pathsep.join(p for p in (stubs_of(comfyui_each_dir), str(REPO)) if p), PYTHONPYCACHEPREFIX=str(base / "pycache"),
               PYTHONUNBUFFERED="1", MESH_RAY_CACHE_DIR=str(base / "cache" / "shards"))
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--database-url", f"sqlite:///{base / 'comfyui.db'}", "--disable-auto-launch"],
        cwd=comfyui_each_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({proc.returncode}): {(base / 'server.log').read_text()[-3000:]}")
            try:
                if _get(f"{url}/mesh/status", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"ComfyUI did not answer within {START_TIMEOUT_S} s: "
                                     f"{(base / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "base": base, "port": port, "address": address}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # ComfyUI exits; its embedded Ray shuts down at exit
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        log.close()


def test_status_route_and_web_extension_answer_over_http(server):
    for path in ("/mesh/status", "/api/mesh/status"):
        code, body = _get(server["url"] + path)
        assert code == 200, path
        assert json.loads(body) == {"address": "", "splits": []}  # nothing built yet: no light is green
    code, body = _get(server["url"] + "/extensions/mesh-ray/mesh_status.js")
    assert code == 200 and b"registerExtension" in body and b"/mesh/status" in body


def test_the_page_is_served_by_the_installed_frontend_package(server):
    import importlib.metadata

    code, body = _get(server["url"] + "/")
    assert code == 200 and b"<html" in body.lower()[:2000]  # the comfy extra's frontend package serves this version
    log = (server["base"] / "server.log").read_text()
    assert "comfyui-frontend-package is not installed" not in log
    assert importlib.metadata.version("comfyui-frontend-package") in _pins()


def _pins() -> str:
    """The frontend pin of the ``comfy`` extra (pyproject.toml)."""
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["comfy"]
    (pin,) = [d for d in extra if d.startswith("comfyui-frontend-package")]
    return pin


def test_every_node_is_in_category_mesh_with_a_tooltip_on_every_input(server):
    code, body = _get(server["url"] + "/object_info", timeout=60)
    info = json.loads(body)
    for name in OUR_NODES:
        node = info[name]
        assert node["category"] == "mesh", name
        for group in ("required", "optional"):
            for inp, spec in node["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def _prompt(vae_name: str, address: str) -> dict:
    return {
        "1": {"class_type": "MeshConnect", "inputs": {"address": address, "timeout_s": 120.0}},
        "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "3": {"class_type": "MeshVAEDecode", "inputs": {"samples": ["2", 0], "mesh": ["1", 0], "vae_name": vae_name,
                                                        "mode": "promise", "replicas": 1, "idle_timeout_s": 0.0}},
        "4": {"class_type": "MeshSavePromisedImage", "inputs": {"promise": ["3", 1], "filename_prefix": "served/img"}},
    }


async def _queue_and_watch(url: str, prompt: dict, extra: dict, out: Path, node: str = "4",
                           pattern: str = "*.png") -> tuple[list, dict, list]:
    import aiohttp

    client_id = uuid.uuid4().hex
    timeout = aiohttp.ClientTimeout(total=EVENT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
            r = await s.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id,
                                                     "extra_data": {"extra_pnginfo": extra}})
            assert r.status == 200, await r.text()
            prompt_id = (await r.json())["prompt_id"]
            at_finish, order = None, []
            while True:
                msg = await asyncio.wait_for(ws.receive(), EVENT_TIMEOUT_S)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                kind, data = event["type"], event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                order.append(kind)
                if kind == "execution_error":
                    raise AssertionError(f"the prompt failed: {data.get('exception_message')}")
                if kind == "execution_success":
                    at_finish = sorted(p.name for p in (out / "served").glob(pattern))
                if kind == "executed" and data["node"] == node and data["output"].get("images"):
                    return at_finish, data, order


def test_promise_through_the_queue_png_written_after_the_prompt_finished(server):
    from PIL import Image

    out = server["base"] / "output"
    extra = {"workflow": {"nodes": [{"id": 4, "type": "MeshSavePromisedImage"}]}}
    prompt = _prompt(VAE, server["address"])
    at_finish, executed, order = asyncio.run(_queue_and_watch(server["url"], prompt, extra, out))
    assert at_finish == []  # the queue was done before the decode was
    assert order.index("execution_success") < len(order) - 1 and order[-1] == "executed"
    (img,) = executed["output"]["images"]
    assert img == {"filename": "img_00001_.png", "subfolder": "served", "type": "output"}
    with Image.open(out / "served" / img["filename"]) as im:
        assert im.size == (512, 512)
        assert json.loads(im.text["prompt"]) == prompt and json.loads(im.text["workflow"]) == extra["workflow"]
    code, body = _get(f"{server['url']}/view?filename={img['filename']}&subfolder=served&type=output")
    assert code == 200 and body[:4] == b"\x89PNG"  # the page can show it


def _write_ltx_vae(path: str) -> None:
    from comfy_integration.small_vaes import write_ltx_video_vae

    write_ltx_video_vae(path, seed=2)


def test_promised_video_through_the_queue_written_after_the_prompt_finished(server, comfyui_each_dir, request):
    import av

    if not (comfyui_each_dir / "comfy" / "nested_tensor.py").is_file():
        pytest.skip("the small LTX VAE is built for ComfyUI 0.20 (0.3.64's LTX VAE class gives other widths)")
    out = server["base"] / "output"
    comfy = request.getfixturevalue("comfy")  # ComfyUI 0.20 in the tests' own host writes the file
    comfy(_write_ltx_vae, str(server["base"] / "models" / "vae" / "ltx-served.safetensors"))
    extra = {"workflow": {"nodes": [{"id": 5, "type": "MeshSavePromisedVideo"}]}}
    prompt = {
        "1": {"class_type": "MeshConnect", "inputs": {"address": server["address"], "timeout_s": 120.0}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "ltx-served.safetensors"}},
        "3": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
        "4": {"class_type": "MeshVAEDecode", "inputs": {"samples": ["3", 0], "mesh": ["1", 0], "vae": ["2", 0],
                                                        "vae_name": "(the vae input)", "mode": "promise", "replicas": 1,
                                                        "idle_timeout_s": 0.0}},
        "5": {"class_type": "MeshSavePromisedVideo", "inputs": {"promise": ["4", 1], "filename_prefix": "served/clip",
                                                                "fps": 24.0}},
    }
    at_finish, executed, order = asyncio.run(_queue_and_watch(server["url"], prompt, extra, out, "5", "*.mp4"))
    assert at_finish == []  # the queue was done before the decode was
    assert order.index("execution_success") < len(order) - 1 and order[-1] == "executed"
    assert executed["output"] == {"images": [{"filename": "clip_00001_.mp4", "subfolder": "served", "type": "output"}],
                                  "animated": [True]}
    with av.open(str(out / "served" / "clip_00001_.mp4")) as c:
        frames = sum(1 for _ in c.decode(video=0))
        v = c.streams.video[0]
        assert (frames, v.width, v.height) == (9, 64, 64)
        assert json.loads(c.metadata["prompt"]) == prompt and json.loads(c.metadata["workflow"]) == extra["workflow"]
    code, _ = _get(f"{server['url']}/view?filename=clip_00001_.mp4&subfolder=served&type=output")
    assert code == 200  # the page can play it


def test_missing_vae_file_is_rejected_with_a_one_line_message(server):
    import urllib.request

    req = urllib.request.Request(f"{server['url']}/prompt", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": _prompt("gone.safetensors", server["address"])}).encode())
    try:
        urllib.request.urlopen(req, timeout=60)
        raise AssertionError("ComfyUI accepted a prompt with a missing VAE file")
    except Exception as e:  # urllib raises HTTPError for the 400
        code, body = e.code, json.loads(e.read())
    assert code == 400
    (err,) = body["node_errors"]["3"]["errors"]
    assert "VAE file 'gone.safetensors' is not in ComfyUI's vae folder" in err["details"]
    assert "\n" not in err["details"]


def test_unreachable_cluster_is_a_one_line_node_error_through_the_queue(server):
    out = server["base"] / "output"
    with socket.socket() as s:  # a closed port on 127.0.0.1
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompt = _prompt(VAE, f"127.0.0.1:{port}")
    with pytest.raises(AssertionError) as failed:
        asyncio.run(_queue_and_watch(server["url"], prompt, {}, out))
    msg = str(failed.value).removeprefix("the prompt failed: ").removesuffix("\n")  # ComfyUI appends one
    assert msg.startswith(f"cannot reach a Ray cluster at 127.0.0.1:{port}") and "\n" not in msg, msg
