"""Screenshot of the status light in the real ComfyUI page (docs/comfyui-status.png).

    COMFYUI_PATH=../shared/comfyui-0.20 python examples/comfyui_status_screenshot.py docs/comfyui-status.png

What it does, all real: starts a local Ray; starts ComfyUI (``main.py --cpu``, temporary folders,
this repository in custom_nodes) and, inside that server process, runs the MeshSplitFlux node's
own code on a small FLUX.1 model built through ComfyUI's classes (a page graph cannot load a small
model: ComfyUI's loader fixes FLUX's widths at 3072) with one KSampler step, so the node's stages
are live; opens the page in headless Chromium (Debian's ``chromium``), puts Mesh Connect,
Load Diffusion Model and Mesh Split Flux on the canvas (the split node gets the id the split was
recorded under), waits for the light to poll ``GET /mesh/status`` and saves a screenshot.  Works on
ComfyUI 0.20.1 and 0.3.64 (the page is the installed ``comfyui-frontend-package``'s).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

from comfy_page import REPO, Page, comfy_args, comfy_env, comfy_folders, free_port, start, start_chromium, stop, wait_for

KEY = "3"  # the id LiteGraph gives the third node added to a cleared graph
N_BLOCKS_REMOTE = 2

LAUNCHER = r'''
import os, runpy, sys, threading, time, urllib.request
cfg = {cfg!r}
KEEP = []
sys.argv = ["main.py", *cfg["args"]]

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
        KEEP.append(split)  # as ComfyUI's cache keeps a node's output: a split nobody holds closes its stages
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
  const connect = add("MeshConnect", 90, 130);
  const unet = add("UNETLoader", 90, 350);
  const split = add("MeshSplitFlux", 500, 150);
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


def _status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/mesh/status", timeout=10) as r:
        return json.loads(r.read())


async def _shoot(debug_port: int, url: str, out: Path) -> str:
    async with Page(debug_port) as page:
        await page.call("Page.enable")
        await page.call("Page.navigate", url=url)
        for _ in range(180):
            if await page.js("Boolean(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph && "
                             "window.LiteGraph && LiteGraph.registered_node_types['MeshSplitFlux'])"):
                break
            await asyncio.sleep(1)
        else:
            raise SystemExit("the ComfyUI page did not load")
        await asyncio.sleep(3)
        node_id = await page.js(PAGE_SETUP)
        await page.js("document.querySelectorAll('.p-dialog-mask, .p-toast').forEach((e) => e.remove()); true")
        await asyncio.sleep(7)  # two polls of /mesh/status (every 3 s)
        await page.screenshot(out)
        return node_id


def main(out: str = "docs/comfyui-status.png") -> None:
    comfyui = Path(os.environ.get("COMFYUI_PATH", REPO.parent / "shared" / "comfyui-0.20")).resolve()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex)
    import ray

    ray.init(address="local", num_cpus=8, num_gpus=0, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    base = comfy_folders("comfyui-shot-")
    port, debug_port = free_port(), free_port()
    cfg = {"args": comfy_args(port, base), "port": port, "base": str(base), "address": address, "key": KEY,
           "n": N_BLOCKS_REMOTE, "helpers": str(REPO / "tests" / "comfy"), "comfyui": str(comfyui)}
    (base / "launch.py").write_text(LAUNCHER.format(cfg=cfg))
    log = open(base / "server.log", "w")
    server = start([sys.executable, str(base / "launch.py")], env=comfy_env(comfyui, base), stdout=log,
                   stderr=subprocess.STDOUT)
    browser = None
    try:
        wait_for("the split to be built in ComfyUI", lambda: (base / "split-ready").exists()
                 or server.poll() is not None or (base / "split-failed").exists(), 600)
        if server.poll() is not None or (base / "split-failed").exists():
            raise SystemExit(f"ComfyUI exited: {(base / 'server.log').read_text()[-2000:]}")
        light = next(s for s in _status(port)["splits"] if s["key"] == KEY)
        print("status:", json.dumps(light))
        browser = start_chromium(debug_port, base, size="1100,700")
        node_id = asyncio.run(_shoot(debug_port, f"http://127.0.0.1:{port}/", Path(out)))
        if node_id != KEY:
            raise SystemExit(f"the page gave MeshSplitFlux id {node_id}, the split was recorded as {KEY}")
        print(f"wrote {out} (light {light['state']}, plan {light['plan']}, address {light['address']})")
    finally:
        stop((browser, signal.SIGTERM), (server, signal.SIGINT))
        ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
