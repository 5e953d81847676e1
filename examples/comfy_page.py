"""What the page-checking examples share: a real ComfyUI server in temporary folders with this
repository in ``custom_nodes/``, headless Chromium (Debian's ``chromium``) and a small client for
Chrome's DevTools protocol (navigate, run page script, read the network log, screenshot).

Used by ``comfyui_queue_button.py`` and ``comfyui_status_screenshot.py`` (run them from anywhere:
Python puts this folder first on ``sys.path``).  Not part of the package; CI has no browser.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
            "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.Minimap.Visible": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> None:
    """Poll ``check()`` each second until it is truthy (an OSError counts as not yet); exit after ``timeout``."""
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


def comfy_folders(prefix: str) -> Path:
    """A temporary ComfyUI base directory: mesh-ray in ``custom_nodes/``, the first-run dialogs off."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "mesh-ray").symlink_to(REPO, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(SETTINGS))
    return base


def comfy_args(port: int, base: Path) -> list[str]:
    """ComfyUI's ``main.py`` arguments: CPU, loopback, the temporary folders, no browser."""
    return ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
            "--database-url", f"sqlite:///{base}/comfyui.db", "--disable-auto-launch"]


def comfy_env(comfyui: Path, base: Path, **extra: str) -> dict[str, str]:
    """The server's environment: this repository and the torchvision/torchaudio stand-ins importable."""
    stubs = comfyui.parent / "comfyui-stubs"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(REPO), str(stubs) if stubs.is_dir() else "") if p),
               PYTHONPYCACHEPREFIX=str(base / "pycache"), **extra)
    return env


def start(args: list[str], **kw: Any) -> subprocess.Popen:
    """A child in its own process group (``stop`` ends the group)."""
    return subprocess.Popen(args, start_new_session=True, **kw)


def start_chromium(debug_port: int, base: Path, size: str = "1280,720") -> subprocess.Popen:
    """Headless Chromium with DevTools on ``debug_port``; returns once DevTools answers."""
    browser = start(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--remote-debugging-port={debug_port}", f"--window-size={size}",
                     f"--user-data-dir={base / 'chromium'}", "about:blank"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("chromium", lambda: urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json", timeout=5), 60)
    return browser


def stop(*procs: tuple[subprocess.Popen | None, int]) -> None:
    """Send each ``(process, signal)`` to its group, wait a minute, then SIGKILL."""
    for proc, sig in procs:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


class Page:
    """The browser's first tab over the DevTools protocol: ``async with Page(port) as page``; protocol
    events seen while waiting for answers collect in ``page.events``."""

    def __init__(self, debug_port: int):
        self.debug_port = debug_port
        self.events: list[dict] = []
        self._seq = 0

    async def __aenter__(self) -> "Page":
        import aiohttp

        with urllib.request.urlopen(f"http://127.0.0.1:{self.debug_port}/json", timeout=10) as r:
            tab = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._ws.close()
        await self._session.close()

    async def call(self, method: str, **params: Any) -> dict:
        """One protocol command and its result (an error exits)."""
        self._seq += 1
        await self._ws.send_json({"id": self._seq, "method": method, "params": params})
        while True:
            msg = json.loads((await self._ws.receive()).data)
            if msg.get("id") == self._seq:
                if "error" in msg:
                    raise SystemExit(f"{method}: {msg['error']}")
                return msg["result"]
            if "method" in msg:
                self.events.append(msg)

    async def js(self, expr: str) -> Any:
        """The value of a page expression (promises awaited; a script error exits)."""
        res = await self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise SystemExit(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def screenshot(self, out: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


__all__ = ["Page", "comfy_args", "comfy_env", "comfy_folders", "free_port", "start", "start_chromium", "stop",
           "wait_for"]
