"""Harness for the ComfyUI-workers tests: a Ray head of their own, real ComfyUI servers as frontends,
a websocket "browser", and the tiny diffusion prompts.

The pytest process never joins the tests' cluster (a driver dies with its cluster, and one test
stops it): the head is a ``ray start --head --block`` process group on 127.0.0.1, workers are started
with the ``mesh-ray`` command, a worker is killed by a short helper process, and the frontends are
``main.py`` processes driven over HTTP and their websocket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from comfy_host import REPO
from comfy_proc import kill_group

HERE = Path(__file__).resolve().parent
TEST_NODES = HERE / "worker_nodes"
RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}): {log.read_text()[-3000:] if log else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing answers on port {port} after {timeout:g} s")


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "MESH_RAY_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


class RayHead:
    """A one-node Ray cluster in its own process group (token auth from the tests' environment)."""

    def __init__(self, workdir: Path, port: int | None = None, num_cpus: int = 6):
        self.workdir, self.port, self.num_cpus = workdir, port or free_port(), num_cpus
        self.proc: subprocess.Popen | None = None
        self.temp: str | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict:
        """The head's (and so its workers') environment: this checkout first on the path, a cache of the test's own."""
        return {**base_env(), "MESH_RAY_CACHE_DIR": str(self.workdir / "cache" / "shards"), "PYTHONPATH": str(REPO)}

    def start(self) -> None:
        self.starts += 1
        self.temp = f"/tmp/mrw-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a limit
        log = self.workdir / f"head{self.starts}.log"
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={self.port}", f"--ray-client-server-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--dashboard-port={free_port()}",
             "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--include-dashboard=false",
             f"--temp-dir={self.temp}", "--disable-usage-stats"],
            env=self.env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, START_TIMEOUT_S, self.proc, log)
        time.sleep(2)

    def stop(self) -> None:
        """Kill the head's process group and any process of its session left outside it."""
        if self.proc is None:
            return
        kill_group(self.proc)
        self.proc = None
        for pid in own_processes(self.temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def own_processes(marker: str | None) -> list[int]:
    """Ids of the processes whose command line names ``marker`` (our head's unique temp dir)."""
    if not marker:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def mesh_ray(head: RayHead, *args: str, timeout: float = 900) -> dict:
    """Run ``mesh-ray ... --address HEAD --json`` and return its JSON line."""
    p = subprocess.run([sys.executable, "-m", "mesh_ray.cli", *args, "--address", head.address, "--json"],
                       capture_output=True, text=True, timeout=timeout, env=head.env(), cwd=str(REPO))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def start_workers(head: RayHead, comfyui_dir: Path, replicas: int) -> dict:
    return mesh_ray(head, "comfy", "workers", "--replicas", str(replicas), "--comfyui", str(comfyui_dir),
                    "--extra-path", str(comfyui_dir.parent / "comfyui-stubs"), "--custom-nodes", str(TEST_NODES),
                    "--threads", "1")


DRIVER = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="mesh-ray", log_to_driver=False, configure_logging=False)
from mesh_ray.workflow.service import find_service
print("ready", flush=True)
for line in sys.stdin:
    cmd, arg = json.loads(line)
    if cmd == "kill":
        ray.kill(ray.get_actor(arg, namespace="mesh-ray"), no_restart=True)
        out = None
    else:  # a call on the dispatcher
        out = ray.get(getattr(find_service(), cmd).remote(*arg), timeout=60)
    print(json.dumps(out, default=str), flush=True)
"""


class Driver:
    """A driver of the tests' cluster, joined ahead of time (so a kill lands at once): kills a worker,
    or asks the dispatcher (``call("runs", client_id)``)."""

    def __init__(self, head: RayHead):
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, head.address], env=head.env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, cmd: str, arg: Any) -> Any:
        self.proc.stdin.write(json.dumps([cmd, arg]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the driver process died"
        return json.loads(line)

    def kill(self, name: str) -> None:
        self._ask("kill", name)

    def call(self, method: str, *args: Any) -> Any:
        return self._ask(method, list(args))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


class Frontend:
    """A real ComfyUI server (``main.py --cpu``) with mesh-ray and the test nodes in custom_nodes."""

    def __init__(self, comfyui_dir: Path, base: Path, address: str, models: dict[str, Path] | None = None):
        self.comfyui_dir, self.base, self.address = comfyui_dir, base, address
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "mesh-ray").symlink_to(REPO, target_is_directory=True)
        (base / "custom_nodes" / "mesh_test_nodes").symlink_to(TEST_NODES / "mesh_test_nodes", target_is_directory=True)
        md = base / "models" / "diffusion_models"
        md.mkdir(parents=True, exist_ok=True)
        for name, src in (models or {}).items():
            os.link(src, md / name)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        stubs = self.comfyui_dir.parent / "comfyui-stubs"
        env = base_env()
        # this checkout before any installed mesh-ray (custom_nodes/mesh-ray is a link to it)
        path = [str(stubs)] if stubs.is_dir() else []
        env.update(PYTHONPATH=os.pathsep.join([*path, str(REPO)]), PYTHONPYCACHEPREFIX=str(self.base / "pycache"),
                   MESH_RAY_ADDRESS=self.address, OMP_NUM_THREADS="1",  # one thread, as the workers: equal numbers
                   MESH_RAY_CACHE_DIR=str(self.base / "cache" / "shards"))
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory",
             str(self.base), "--database-url", f"sqlite:///{self.base / 'comfyui.db'}", "--disable-auto-launch",
             "--disable-api-nodes"],
            cwd=self.comfyui_dir, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            assert self.alive(), f"ComfyUI exited: {self.log.read_text()[-3000:]}"
            try:
                if self.get("/mesh/queue/status", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"ComfyUI did not answer within {START_TIMEOUT_S} s: {self.log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        except ProcessLookupError:
            pass

    # -- HTTP ---------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: dict, timeout: float = 300) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def queue(self, prompt: dict, client_id: str | None = None, route: str = "/mesh/queue", **extra: Any) -> str:
        code, body = self.post(route, {"prompt": prompt, "client_id": client_id,
                                       "extra_data": {"extra_pnginfo": {"workflow": {"id": "test"}}, **extra}})
        assert code == 200, body
        return body["prompt_id"]

    def status(self) -> dict:
        return self.get("/mesh/queue/status")[1]

    def history(self, pid: str) -> dict:
        return self.get(f"/history/{pid}")[1].get(pid, {})

    def wait_finished(self, pids: list[str], timeout: float = 600) -> dict:
        """The mesh status entries of ``pids`` once all have finished."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            done = self.status()["finished"]
            if all(p in done for p in pids):
                return {p: done[p] for p in pids}
            time.sleep(0.5)
        raise AssertionError(f"prompts not finished after {timeout:g} s: {self.status()}")

    def wait_local(self, pid: str, timeout: float = 600) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            h = self.history(pid)
            if h.get("status", {}).get("completed") is not None and h["status"].get("status_str"):
                return h
            time.sleep(0.5)
        raise AssertionError(f"local prompt {pid} did not finish")

    def output_files(self, prefix: str) -> list[Path]:
        return sorted((self.base / "output").glob(f"{prefix}*"))


class Browser:
    """A websocket client like ComfyUI's page: sends its feature flags, records every message in order."""

    def __init__(self, frontend: Frontend, preview_metadata: bool = True):
        self.client_id = uuid.uuid4().hex
        self.messages: list[tuple[str, Any]] = []  # ("json" type, data) or ("binary", event type)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = False
        url = f"{frontend.url.replace('http', 'ws')}/ws?clientId={self.client_id}"
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(url, preview_metadata)), daemon=True)
        self._thread.start()
        assert self._ready.wait(60), "the websocket did not open"

    async def _run(self, url: str, preview_metadata: bool) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": preview_metadata}})
            self._ready.set()
            while not self._stop:
                try:
                    msg = await ws.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    d = json.loads(msg.data)
                    with self._lock:
                        self.messages.append((d["type"], d.get("data")))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    with self._lock:
                        self.messages.append(("binary", int.from_bytes(msg.data[:4], "big")))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

    def snapshot(self) -> list[tuple[str, Any]]:
        with self._lock:
            return list(self.messages)

    def of(self, pid: str) -> list[tuple[str, Any]]:
        """The JSON messages about one prompt, in order."""
        with self._lock:
            return [(t, d) for t, d in self.messages if isinstance(d, dict) and d.get("prompt_id") == pid]

    def wait_for(self, pid: str, kind: str, timeout: float = 600) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, d in self.of(pid):
                if t == kind and (kind != "executing" or d.get("node") is None):
                    return d
            time.sleep(0.1)
        raise AssertionError(f"no {kind} for {pid} within {timeout:g} s: {[t for t, _ in self.of(pid)]}")

    def close(self) -> None:
        self._stop = True
        self._thread.join(10)


def write_tiny_model(path: Path, seed: int) -> Path:
    """The tests' diffusion model: ``queue_bench.tiny_flux2_model`` at its smallest."""
    from comfy_integration.queue_bench import tiny_flux2_model

    return tiny_flux2_model(path, seed=seed)


def diffusion_prompt(model: str, seed: int, steps: int, prefix: str, size: int = 64) -> dict:
    """The bench's prompt (UNETLoader + KSampler, the latent saved), plus an image saved through the
    test-only node (no VAE)."""
    from comfy_integration.queue_bench import diffusion_prompt as latent_prompt

    return {**latent_prompt(model, seed, steps, prefix, size),
            "8": {"class_type": "MeshTestLatentToImage", "inputs": {"samples": ["6", 0], "scale": 16}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}}}


def image_prompt(image: str, prefix: str) -> dict:
    """LoadImage of an uploaded input file, scaled, saved: the input travels with the prompt."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                     "width": 32, "height": 24, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def pixels(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def latent(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]
