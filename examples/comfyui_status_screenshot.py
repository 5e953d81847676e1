"""Screenshot of the status light in the real ComfyUI page (docs/comfyui-status.png).

    COMFYUI_PATH=../shared/comfyui python examples/comfyui_status_screenshot.py docs/comfyui-status.png

What it does, all real: starts a local Ray; starts ComfyUI (``main.py --cpu``, temporary folders,
this repository in custom_nodes) and, inside that server process, runs the MeshSplitFlux node's
own code on a small FLUX.1 model built through ComfyUI's classes (a page graph cannot load a small
model: ComfyUI's loader fixes FLUX's widths at 3072) with one KSampler step, so the node's stages
are live; opens the page in headless Chromium (Debian's ``chromium``), puts Mesh Connect,
Load Diffusion Model and Mesh Split Flux on the canvas (the split node gets the id the split was
recorded under), waits for the light to poll ``GET /mesh/status`` and saves a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "3"  # the id LiteGraph gives the third node added to a cleared graph
N_BLOCKS_REMOTE = 2

LAUNCHER = r'''
import os, runpy, sys, threading, time, urllib.request
cfg = {cfg!r}
sys.argv = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(cfg["port"]), "--base-directory", cfg["base"],
            "--database-url", "sqlite:///" + cfg["base"] + "/comfyui.db", "--disable-auto-launch"]

def build():
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{{cfg['port']}}/mesh/status", timeout=5)
            break
        except Exception:
            time.sleep(1)
    try:
        sys.path.insert(0, cfg["helpers"])
        import comfy_host as h  # the tests' helpers: a small FLUX.1 through ComfyUI's classes, KSampler
        import server
        server.PromptServer.instance.last_prompt_id = None  # progress events of a run outside a prompt
        mesh, = h.run_node("MeshConnect", address=cfg["address"])
        split, = h.run_node("MeshSplitFlux", model=h.flux_patcher(seed=0), mesh=mesh, n_blocks_remote=cfg["n"],
                            stages="", codec_mode="raw", unique_id=cfg["key"])
        h.ksample(split, seed=1, steps=1)
        open(os.path.join(cfg["base"], "split-ready"), "w").write("ok")
    except BaseException as e:
        open(os.path.join(cfg["base"], "split-failed"), "w").write(repr(e))
        raise

threading.Thread(target=build, daemon=True).start()
sys.path.insert(0, cfg["comfyui"])
os.chdir(cfg["comfyui"])
runpy.run_path("main.py", run_name="__main__")
'''

PAGE_SETUP = """
(async () => {
  const app = window.comfyAPI.app.app;
  app.graph.clear();
  const add = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
  const connect = add("MeshConnect", 60, 80);
  const unet = add("UNETLoader", 60, 300);
  const split = add("MeshSplitFlux", 470, 120);
  unet.connect(0, split, split.findInputSlot("model"));
  connect.connect(0, split, split.findInputSlot("mesh"));
  const w = split.widgets.find((w) => w.name === "n_blocks_remote");
  if (w) w.value = %d;
  split.size = [Math.max(split.size[0], 380), split.size[1]];
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1.0;
  app.graph.setDirtyCanvas(true, true);
  return String(split.id);
})()
""" % N_BLOCKS_REMOTE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(1)


def _status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/mesh/status", timeout=10) as r:
        return json.loads(r.read())


async def _shoot(debug_port: int, url: str, out: Path) -> str:
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json", timeout=10) as r:
        page = next(t for t in json.loads(r.read()) if t["type"] == "page")
    async with aiohttp.ClientSession() as s, s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
        seq = 0

        async def call(method: str, **params):
            nonlocal seq
            seq += 1
            await ws.send_json({"id": seq, "method": method, "params": params})
            while True:
                msg = json.loads((await ws.receive()).data)
                if msg.get("id") == seq:
                    if "error" in msg:
                        raise SystemExit(f"{method}: {msg['error']}")
                    return msg["result"]

        async def js(expr: str):
            res = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
            if "exceptionDetails" in res:
                raise SystemExit(f"page script failed: {res['exceptionDetails']}")
            return res["result"].get("value")

        await call("Page.enable")
        await call("Page.navigate", url=url)
        for _ in range(180):
            if await js("Boolean(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph && "
                        "window.LiteGraph && LiteGraph.registered_node_types['MeshSplitFlux'])"):
                break
            await asyncio.sleep(1)
        else:
            raise SystemExit("the ComfyUI page did not load")
        await asyncio.sleep(3)
        node_id = await js(PAGE_SETUP)
        await js("document.querySelectorAll('.p-dialog-mask, .p-toast').forEach((e) => e.remove()); true")
        await asyncio.sleep(7)  # two polls of /mesh/status (every 3 s)
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        return node_id


def main(out: str = "docs/comfyui-status.png") -> None:
    comfyui = Path(os.environ.get("COMFYUI_PATH", REPO.parent / "shared" / "comfyui")).resolve()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex)
    import ray

    ray.init(address="local", num_cpus=8, num_gpus=0, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    base = Path(tempfile.mkdtemp(prefix="comfyui-shot-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "mesh-ray").symlink_to(REPO, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                                    "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.Minimap.Visible": False}))
    port, debug_port = _free_port(), _free_port()
    cfg = {"port": port, "base": str(base), "address": address, "key": KEY, "n": N_BLOCKS_REMOTE,
           "helpers": str(REPO / "tests" / "comfy"), "comfyui": str(comfyui)}
    (base / "launch.py").write_text(LAUNCHER.format(cfg=cfg))
    stubs = comfyui.parent / "comfyui-stubs"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(stubs) if stubs.is_dir() else "", str(REPO)) if p),
               PYTHONPYCACHEPREFIX=str(base / "pycache"))
    log = open(base / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(base / "launch.py")], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    browser = None
    try:
        _wait("the split to be built in ComfyUI", lambda: (base / "split-ready").exists() or server.poll() is not None
              or (base / "split-failed").exists(), 600)
        if server.poll() is not None or (base / "split-failed").exists():
            raise SystemExit(f"ComfyUI exited: {(base / 'server.log').read_text()[-2000:]}")
        light = next(s for s in _status(port)["splits"] if s["key"] == KEY)
        print("status:", json.dumps(light))
        browser = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
                                    "--hide-scrollbars", f"--remote-debugging-port={debug_port}",
                                    "--window-size=1100,640", f"--user-data-dir={base / 'chromium'}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait("chromium", lambda: urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json", timeout=5), 60)
        node_id = asyncio.run(_shoot(debug_port, f"http://127.0.0.1:{port}/", Path(out)))
        if node_id != KEY:
            raise SystemExit(f"the page gave MeshSplitFlux id {node_id}, the split was recorded as {KEY}")
        print(f"wrote {out} (light {light['state']}, plan {light['plan']}, address {light['address']})")
    finally:
        for proc, sig in ((browser, signal.SIGTERM), (server, signal.SIGINT)):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
