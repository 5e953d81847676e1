"""Helpers the tests share (imported as ``from helpers import ...``; fixtures stay in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import ray
import torch

from mesh_ray.models.checkpoint import inspect, load_blocks
from mesh_ray.models.flux import build, position_ids

RAY_CPUS = 8  # logical CPUs: more than the 2 real cores, so several stage actors fit


def ensure_ray() -> None:
    """Start the test cluster if no test has (tests that need their own cluster shut it down)."""
    if not ray.is_initialized():
        # address="local": always a cluster of our own, never one a `ray start` left on this machine
        ray.init(address="local", num_cpus=RAY_CPUS, num_gpus=0, include_dashboard=False, namespace="mesh-ray-tests",
                 log_to_driver=False, configure_logging=False)


def inputs(cfg, b=2, h=4, w=6, txt_len=5, seed=0):
    """Seeded forward inputs (img, img_ids, txt, txt_ids, timesteps, y, guidance) for a FLUX config."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, h * w, cfg.in_channels, generator=g)
    txt = torch.randn(b, txt_len, cfg.context_in_dim, generator=g)
    img_ids, txt_ids = position_ids(cfg.arch, b, h, w, txt_len)
    t = torch.rand(b, generator=g)
    y = torch.randn(b, cfg.vec_in_dim, generator=g) if cfg.vec_in_dim else None
    guidance = torch.full((b,), 3.5) if cfg.guidance_embed else None
    return img, img_ids, txt, txt_ids, t, y, guidance


def local_model(path):
    """The whole model of a checkpoint in this process (the reference a split is compared with)."""
    info = inspect(path)
    model = build(info.config, "meta")
    model.load_state_dict(load_blocks(path, ["all"], non_block=True, info=info), assign=True, strict=True)
    return model


CLI = [sys.executable, "-m", "mesh_ray.cli"]


def run(*args, timeout=300, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def last_json(out):
    return json.loads(out.stdout.strip().splitlines()[-1])


def kill_actor(actor, timeout: float = 30.0) -> None:
    """``ray.kill`` (restart allowed) on an actor whose ``info()`` reports its ``pid`` (a stage), then
    wait until the old process is gone: the kill is asynchronous, and a call made at once could
    still run on the old process.  Ray's public actor-state API (``ray.util.state``) needs the
    dashboard, which the test cluster does not run, so the actor itself is asked: a call that fails
    (dead, or restarting) or a new pid means the kill has landed."""
    before = ray.get(actor.info.remote(), timeout=timeout)["pid"]
    ray.kill(actor, no_restart=False)
    wait_killed(actor, before, timeout)


def wait_killed(actor, before: int, timeout: float = 30.0) -> None:
    """Wait until the process ``before`` of a killed stage actor no longer answers (see ``kill_actor``)."""
    import time

    from ray.exceptions import GetTimeoutError, RayActorError

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if ray.get(actor.info.remote(), timeout=1.0)["pid"] != before:
                return
        except RayActorError:  # ActorDiedError / ActorUnavailableError: the old process is gone
            return
        except GetTimeoutError:  # queued behind a restart (or a long call): ask again
            pass
        time.sleep(0.01)
    raise AssertionError(f"actor (pid {before}) still answering {timeout:g} s after ray.kill")


@contextlib.contextmanager
def local_cluster(nodes: int, num_cpus: int = 1):
    """A ``ray.cluster_utils.Cluster`` of the test's own: a head without CPUs and ``nodes`` worker
    nodes of ``num_cpus`` each (the session's Ray is shut down first; everything is shut down after)."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=num_cpus)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
