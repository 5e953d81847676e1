"""Check the "Queue on mesh" button in the real ComfyUI page, and screenshot it (docs/comfyui-queue-button.png).

    COMFYUI_PATH=../shared/comfyui-0.20 python examples/comfyui_queue_button.py docs/comfyui-queue-button.png

What it does, all real: starts ComfyUI (``main.py --cpu``, temporary folders, this repository in
custom_nodes, its frontend package as installed) with ``MESH_RAY_ADDRESS`` pointing at a closed
port on 127.0.0.1, so the mesh is down; opens the page in headless Chromium (Debian's
``chromium``); finds the button in ComfyUI's action bar; clicks it; and checks through the
browser's own network log that the click sent the page's workflow as ``POST /mesh/queue`` (the
body ComfyUI's Run button sends to ``/prompt``), that the server answered with the one-line "down"
message (503), and that ComfyUI's own ``/prompt`` was not called.  Exits non-zero on any miss.
The queue's behaviour with a live cluster is tested in ``tests/comfy/test_comfy_workers.py``; this
script checks what no test here can: the page itself (no browser in CI).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABEL = "Queue on mesh"

FIND = """
(() => {
  const all = [...document.querySelectorAll('button, [role="button"]')];
  const b = all.find((e) => (e.textContent || '').includes(%r) || (e.getAttribute('aria-label') || '').includes(%r)
                        || (e.title || '').includes(%r));
  if (!b) return null;
  b.setAttribute('data-mesh-check', '1');
  const r = b.getBoundingClientRect();
  return {text: (b.textContent || '').trim(), aria: b.getAttribute('aria-label'), x: r.x, y: r.y, w: r.width, h: r.height};
})()
""" % (LABEL, LABEL, LABEL)


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


async def _check(debug_port: int, url: str, out: Path) -> dict:
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json", timeout=10) as r:
        page = next(t for t in json.loads(r.read()) if t["type"] == "page")
    async with aiohttp.ClientSession() as s, s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
        seq, events = 0, []

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
                if "method" in msg:
                    events.append(msg)

        async def js(expr: str):
            res = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
            if "exceptionDetails" in res:
                raise SystemExit(f"page script failed: {res['exceptionDetails']}")
            return res["result"].get("value")

        await call("Page.enable")
        await call("Network.enable")
        await call("Page.navigate", url=url)
        found = None
        for _ in range(180):
            if await js("Boolean(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph)"):
                found = await js(FIND)
                if found:
                    break
            await asyncio.sleep(1)
        if not found:
            raise SystemExit(f"no button labelled {LABEL!r} in the ComfyUI page")
        await asyncio.sleep(2)
        await js("document.querySelectorAll('.p-dialog-mask').forEach((e) => e.remove()); true")
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        await js("document.querySelector('[data-mesh-check]').click(); true")
        for _ in range(30):  # the click: the graph to a prompt, then the POST
            await asyncio.sleep(1)
            await js("1")  # drain events
            if any(e["method"] == "Network.responseReceived" and "/mesh/queue" in e["params"]["response"]["url"]
                   and "status" not in e["params"]["response"]["url"] for e in events):
                break
        sent = [e["params"]["request"] for e in events if e["method"] == "Network.requestWillBeSent"]
        got = [e["params"]["response"] for e in events if e["method"] == "Network.responseReceived"]
        return {"button": found,
                "queue_posts": [r["url"] for r in sent if r["url"].endswith("/mesh/queue") and r["method"] == "POST"],
                "queue_body_has_prompt": any("prompt" in json.loads(r.get("postData") or "{}") for r in sent
                                             if r["url"].endswith("/mesh/queue")),
                "queue_status": [r["status"] for r in got if r["url"].endswith("/mesh/queue")],
                "prompt_posts": [r["url"] for r in sent if r["url"].endswith("/prompt") and r["method"] == "POST"]}


def main(out: str = "docs/comfyui-queue-button.png") -> None:
    comfyui = Path(os.environ.get("COMFYUI_PATH", REPO.parent / "shared" / "comfyui-0.20")).resolve()
    base = Path(tempfile.mkdtemp(prefix="comfyui-button-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "mesh-ray").symlink_to(REPO, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                                    "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.Minimap.Visible": False}))
    port, debug_port, closed = _free_port(), _free_port(), _free_port()
    stubs = comfyui.parent / "comfyui-stubs"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(REPO), str(stubs) if stubs.is_dir() else "") if p),
               PYTHONPYCACHEPREFIX=str(base / "pycache"), MESH_RAY_ADDRESS=f"127.0.0.1:{closed}")
    log = open(base / "server.log", "w")
    server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--base-directory", str(base), "--database-url", f"sqlite:///{base}/comfyui.db",
                               "--disable-auto-launch"], cwd=comfyui, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    browser = None
    try:
        _wait("ComfyUI", lambda: server.poll() is not None or urllib.request.urlopen(
            f"http://127.0.0.1:{port}/mesh/queue/status", timeout=5), 300)
        if server.poll() is not None:
            raise SystemExit(f"ComfyUI exited: {(base / 'server.log').read_text()[-2000:]}")
        browser = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                    "--no-first-run", f"--remote-debugging-port={debug_port}", "--window-size=1280,720",
                                    f"--user-data-dir={base / 'chromium'}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait("chromium", lambda: urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json", timeout=5), 60)
        got = asyncio.run(_check(debug_port, f"http://127.0.0.1:{port}/", Path(out)))
        print(json.dumps(got))
        ok = got["queue_posts"] and got["queue_body_has_prompt"] and got["queue_status"] == [503] \
            and not got["prompt_posts"]
        if not ok:
            raise SystemExit(f"the button did not send the workflow to /mesh/queue as expected: {got}")
        print(f"ok: the button is in the page and sends the workflow to /mesh/queue; wrote {out}")
    finally:
        for proc, sig in ((browser, signal.SIGTERM), (server, signal.SIGINT)):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main(*sys.argv[1:])
