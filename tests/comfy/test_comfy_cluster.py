"""The whole Ray cluster goes away and comes back while ComfyUI runs: the queue in between is a
one-line node error, the status light goes red, and the next queue after the cluster is back
reconnects (a new connection and new stages) without restarting ComfyUI and gives the same latent;
``Mesh VAE Decode`` fed the same cached connection decodes again on new decoders.

ComfyUI runs in a child process (``comfy_proc.ComfyProcess``) that joins a ``ray start --head``
cluster on a free port of this machine; the test ends that cluster by its process group (as a
crash would) and starts it again at the same port.  The cluster stays down for longer than Ray's
own 60 s GCS reconnect limit, after which Ray would end a driver that did not raise it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import comfy_host as h
from comfy_proc import ComfyProcess, kill_group

START_TIMEOUT_S = 180
CALL_TIMEOUT_S = 600
DOWN_FOR_S = 65  # longer than Ray's default gcs_rpc_server_reconnect_timeout_s (60 s)
RTOL = 1e-5  # as tests/comfy/test_comfy_split.py
KEY = "cluster-back"


class RayHead:
    """``ray start --head --block`` on ``port`` in its own process group (ended by group id)."""

    def __init__(self, port: int, workdir: Path):
        self.port, self.proc = port, None
        self.temp = Path(tempfile.mkdtemp(prefix="mr-head-"))  # short: Ray's socket paths have a length limit
        self.log = workdir / "ray-head.log"

    def start(self) -> None:
        ray_cli = Path(sys.executable).parent / "ray"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        start = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [str(ray_cli), "start", "--head", f"--port={self.port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats", "--object-store-memory=200000000", f"--temp-dir={self.temp}", "--block"],
            env=env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in self.log.read_text()[start:]:
            if self.proc.poll() is not None:
                raise AssertionError(f"ray start exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"ray start did not finish within {START_TIMEOUT_S} s")
            time.sleep(0.5)

    def kill(self) -> None:
        """End the head and every process it started (GCS, raylet, workers), as a crash would."""
        kill_group(self.proc)
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster_and_comfy(comfyui_dir, tmp_path):
    head = RayHead(_free_port(), tmp_path)
    proc = None
    try:
        head.start()
        proc = ComfyProcess(h.REPO, comfyui_dir, tmp_path / "comfy", tmp_path / "comfy.log")
        yield head, proc
    finally:
        if proc is not None:
            proc.close()
        head.close()


# -- bodies run inside the ComfyUI process --------------------------------------------------------

def _light() -> dict | None:
    from comfy_integration import registry

    return next((s for s in registry.status()["splits"] if s["key"] == KEY), None)


def _decode(mesh):
    """``Mesh VAE Decode`` (wait mode) of a fixed latent with a tiny VAE in ComfyUI's vae folder."""
    import folder_paths
    import torch

    from mesh_ray.models.vae import write_random_vae

    name = "cluster-back-vae.safetensors"
    path = f"{folder_paths.get_folder_paths('vae')[0]}/{name}"
    if not os.path.exists(path):
        write_random_vae(path, "tiny-flux1", seed=3)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    return h.run_node("MeshVAEDecode", samples={"samples": latent}, mesh=mesh, vae_name=name, mode="wait",
                      replicas=1, idle_timeout_s=0.0)["result"][0]


def _first_queue(address: str) -> dict:
    import __main__

    model = h.flux_patcher(seed=0)
    ref = h.ksample(model, seed=6, steps=2)
    mesh, = h.run_node("MeshConnect", address=address, timeout_s=120.0)
    split, = h.run_node("MeshSplitFlux", model=model, mesh=mesh, n_blocks_remote=3, stages="", codec_mode="raw",
                        unique_id=KEY)
    first = h.ksample(split, seed=6, steps=2)
    __main__.KEPT.update(split=split, mesh=mesh, first=first, image=_decode(mesh))
    return {"diff": float((first - ref).abs().max()), "scale": float(ref.abs().max()), "light": _light()}


def _queue_while_down(address: str) -> dict:
    """The same cached MODEL queued again (ComfyUI re-runs only the KSampler), and MeshConnect re-run."""
    import __main__

    from mesh_ray.errors import MeshError

    out = {}
    try:
        h.ksample(__main__.KEPT["split"], seed=6, steps=2)
        out["queue"] = None
    except MeshError as e:
        out["queue"] = f"{type(e).__name__}: {e}"
    try:
        h.run_node("MeshConnect", address=address, timeout_s=5.0)
        out["connect"] = None
    except MeshError as e:
        out["connect"] = f"{type(e).__name__}: {e}"
    try:
        _decode(__main__.KEPT["mesh"])
        out["decode"] = None
    except MeshError as e:
        out["decode"] = f"{type(e).__name__}: {e}"
    out["light"] = _light()
    return out


def _queue_after(address: str) -> dict:
    import __main__

    kept = __main__.KEPT
    before = _light()
    second = h.ksample(kept["split"], seed=6, steps=2)  # the cached MODEL: its stages reconnect
    after = _light()
    remote = h.remote_of(kept["split"])
    image = _decode(kept["mesh"])  # the cached connection: decoders made again on the cluster that came back
    mesh, = h.run_node("MeshConnect", address=address, timeout_s=30.0)
    out = {"image_same": bool((image == kept["image"]).all()),
           "diff": float((second - kept["first"]).abs().max()), "scale": float(kept["first"].abs().max()),
           "before": before, "after": after, "builds": remote.builds, "new_mesh": remote.mesh is not kept["mesh"],
           "connect_same": mesh is remote.mesh}
    remote.close()
    return out


def test_cluster_goes_away_and_comes_back_without_restarting_comfyui(cluster_and_comfy):
    head, proc = cluster_and_comfy
    address = f"127.0.0.1:{head.port}"
    first = proc.call(_first_queue, address, timeout=CALL_TIMEOUT_S)
    assert first["diff"] <= RTOL * first["scale"], first
    assert first["light"]["state"] == "green", first

    head.kill()
    down_at = time.monotonic()
    down = proc.call(_queue_while_down, address, timeout=120)
    for what in ("queue", "connect", "decode"):
        msg = down[what]
        assert msg and msg.startswith("ClusterError: ") and "\n" not in msg, down
        assert address in msg, down
    assert "went away" in down["queue"] and "queue again" in down["queue"], down
    assert down["light"]["state"] == "red" and down["light"]["error"], down

    time.sleep(max(0.0, DOWN_FOR_S - (time.monotonic() - down_at)))  # past Ray's own 60 s limit
    still = proc.call(_queue_while_down, address, timeout=120)  # the ComfyUI process is still there
    assert still["queue"] and "went away" in still["queue"], still

    head.start()  # the same address
    back = proc.call(_queue_after, address, timeout=CALL_TIMEOUT_S)
    assert back["before"]["state"] == "red", back
    assert back["after"]["state"] == "green", back
    assert back["new_mesh"] and back["connect_same"] and back["builds"] == 2, back
    assert back["diff"] <= RTOL * back["scale"], back
    assert back["image_same"], back
