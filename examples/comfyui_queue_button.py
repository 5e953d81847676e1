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
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from comfy_page import (REPO, Page, comfy_args, comfy_env, comfy_folders, free_port, start, start_chromium, stop,
                        wait_for)

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


async def _check(debug_port: int, url: str, out: Path) -> dict:
    async with Page(debug_port) as page:
        await page.call("Page.enable")
        await page.call("Network.enable")
        await page.call("Page.navigate", url=url)
        found = None
        for _ in range(180):
            if await page.js("Boolean(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph)"):
                found = await page.js(FIND)
                if found:
                    break
            await asyncio.sleep(1)
        if not found:
            raise SystemExit(f"no button labelled {LABEL!r} in the ComfyUI page")
        await asyncio.sleep(2)
        await page.js("document.querySelectorAll('.p-dialog-mask').forEach((e) => e.remove()); true")
        await page.screenshot(out)
        await page.js("document.querySelector('[data-mesh-check]').click(); true")
        for _ in range(30):  # the click: the graph to a prompt, then the POST
            await asyncio.sleep(1)
            await page.js("1")  # collect the events that arrived meanwhile
            if any(e["method"] == "Network.responseReceived" and "/mesh/queue" in e["params"]["response"]["url"]
                   and "status" not in e["params"]["response"]["url"] for e in page.events):
                break
        sent = [e["params"]["request"] for e in page.events if e["method"] == "Network.requestWillBeSent"]
        got = [e["params"]["response"] for e in page.events if e["method"] == "Network.responseReceived"]
    return {"button": found,
            "queue_posts": [r["url"] for r in sent if r["url"].endswith("/mesh/queue") and r["method"] == "POST"],
            "queue_body_has_prompt": any("prompt" in json.loads(r.get("postData") or "{}") for r in sent
                                         if r["url"].endswith("/mesh/queue")),
            "queue_status": [r["status"] for r in got if r["url"].endswith("/mesh/queue")],
            "prompt_posts": [r["url"] for r in sent if r["url"].endswith("/prompt") and r["method"] == "POST"]}


def main(out: str = "docs/comfyui-queue-button.png") -> None:
    comfyui = Path(os.environ.get("COMFYUI_PATH", REPO.parent / "shared" / "comfyui-0.20")).resolve()
    base = comfy_folders("comfyui-button-")
    port, debug_port, closed = free_port(), free_port(), free_port()
    log = open(base / "server.log", "w")
    server = start([sys.executable, "main.py", *comfy_args(port, base)], cwd=comfyui, stdout=log,
                   stderr=subprocess.STDOUT, env=comfy_env(comfyui, base, MESH_RAY_ADDRESS=f"127.0.0.1:{closed}"))
    browser = None
    try:
        wait_for("ComfyUI", lambda: server.poll() is not None or urllib.request.urlopen(
            f"http://127.0.0.1:{port}/mesh/queue/status", timeout=5), 300)
        if server.poll() is not None:
            raise SystemExit(f"ComfyUI exited: {(base / 'server.log').read_text()[-2000:]}")
        browser = start_chromium(debug_port, base)
        got = asyncio.run(_check(debug_port, f"http://127.0.0.1:{port}/", Path(out)))
        print(json.dumps(got))
        ok = got["queue_posts"] and got["queue_body_has_prompt"] and got["queue_status"] == [503] \
            and not got["prompt_posts"]
        if not ok:
            raise SystemExit(f"the button did not send the workflow to /mesh/queue as expected: {got}")
        print(f"ok: the button is in the page and sends the workflow to /mesh/queue; wrote {out}")
    finally:
        stop((browser, signal.SIGTERM), (server, signal.SIGINT))


if __name__ == "__main__":
    main(*sys.argv[1:])
