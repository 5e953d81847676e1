"""VAE decoder actors on a real local Ray: wait / forget / promise, restarts, idle timeout, errors."""

from __future__ import annotations

import time

import pytest
import ray
import torch
from PIL import Image
from ray.exceptions import RayActorError

from mesh_ray.errors import ClusterError, ConfigError
from mesh_ray.models.vae import load_vae, write_random_vae
from mesh_ray.vae.promise import Promise, save_promised
from mesh_ray.vae.service import VaeService

ACTOR_OPTS = dict(num_cpus=0.5, torch_threads=1)


def _latent(h: int, w: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 16, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return write_random_vae(tmp_path_factory.mktemp("vae") / "tiny-flux1.safetensors", "tiny-flux1", seed=11)


@pytest.fixture(scope="module")
def service(vae_file, tmp_path_factory):
    from helpers import ensure_ray  # the session Ray of tests/conftest.py (ray_local is per test)

    ensure_ray()
    svc = VaeService(vae_file, replicas=2, output_dir=tmp_path_factory.mktemp("forget"), **ACTOR_OPTS)
    yield svc
    svc.close()


def _wait_until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_actor_decode_equals_local_and_both_replicas_work(ray_local, service, vae_file):
    local = load_vae(vae_file)
    before = [r["completed"] for r in service.stats()["replicas"]]
    for seed in range(4):
        lat = _latent(8, 12, b=2, seed=seed)
        images = service.decode(lat, mode="wait", timeout=60)
        assert images.shape == (2, 64, 96, 3) and images.dtype == torch.float32
        assert torch.allclose(images, local.decode(lat), atol=1e-5)
    after = [r["completed"] for r in service.stats()["replicas"]]
    assert all(a - b >= 1 for a, b in zip(after, before)), (before, after)
    info = service.replica_info()
    assert {i["device"] for i in info} == {"cpu"} and all(i["torch_threads"] == 1 for i in info)


def test_promise_save_returns_before_the_file_exists(ray_local, service, tmp_path):
    lat = _latent(96, 96, b=2)  # large enough that the decode outlasts the save() call
    t0 = time.perf_counter()
    promise = service.decode(lat, mode="promise", timeout=120)
    handle = promise.save(tmp_path / "out", metadata={"prompt": "a promised cat"})
    blocked = time.perf_counter() - t0
    assert isinstance(promise, Promise) and not handle.done()
    assert not list((tmp_path / "out").glob("*.png")) and blocked < 0.5
    paths = handle.result(timeout=120)
    assert [p.name for p in paths] == [f"mesh_ray_{promise.id}_00.png", f"mesh_ray_{promise.id}_01.png"]
    assert promise.done() and promise.result(10).shape == (2, 768, 768, 3)
    with Image.open(paths[1]) as im:
        assert im.size == (768, 768) and im.text["prompt"] == "a promised cat"
    # save_promised: one handle per promise, all written.
    promises = [service.decode(_latent(4, 4, seed=s), mode="promise") for s in range(3)]
    handles = save_promised(promises, tmp_path / "batch", metadata={"k": 1})
    assert sorted(p.name for h in handles for p in h.result(60)) == sorted(
        f"mesh_ray_{p.id}_00.png" for p in promises)


@ray.remote(num_cpus=0)
def _images_when(flag: str, timeout_s: float = 60.0):
    """Images [1, 8, 8, 3] once ``flag`` exists (a decode that finishes when the test says so)."""
    import os

    import numpy as np

    end = time.monotonic() + timeout_s
    while not os.path.exists(flag) and time.monotonic() < end:
        time.sleep(0.05)
    return np.full((1, 8, 8, 3), 0.5, dtype=np.float32)


def test_saves_reuse_writer_threads_and_never_wait_behind_a_pending_one(ray_local, tmp_path):
    """Deferred saves run on reused writer threads (not one new thread per save: that spread the
    decoded images over many malloc arenas), and a ready save is not held up by a pending one."""
    import threading

    flag = tmp_path / "go"
    slow = Promise(_images_when.remote(str(flag)), timeout_s=60).save(tmp_path / "slow")
    ready = [Promise(ray.put(torch.full((1, 8, 8, 3), 0.25).numpy()), timeout_s=60) for _ in range(8)]
    names = []
    for k, p in enumerate(ready):  # one after the other: each finds a writer idle
        handle = p.save(tmp_path / f"ready{k}")
        handle.add_done_callback(lambda _h: names.append(threading.current_thread().name))  # the writer's
        handle.result(60)
    assert not slow.done()  # still waiting for its images while the others were written
    writers = {n for n in names if n.startswith("mesh-ray-save-")}
    assert len(writers) < len(ready), names  # reused (idle writers left by earlier tests may share the work)
    flag.touch()
    assert [p.name for p in slow.result(60)] and list((tmp_path / "slow").glob("*.png"))
    # a writer keeps nothing of a finished save: the promise (and its images) can go
    import gc
    import weakref

    gone = weakref.ref(ready[0])
    del ready, p
    end = time.monotonic() + 10
    while gone() is not None and time.monotonic() < end:  # the writer may still be leaving the job
        gc.collect()
        time.sleep(0.05)
    assert gone() is None


def test_forget_writes_pngs_with_metadata(ray_local, service):
    before = service.stats()
    rid = service.decode(_latent(4, 6), mode="forget", save="runs/cat", metadata={"prompt": "a cat", "seed": 7})
    service.drain(timeout=60)
    path = service.output_dir + f"/runs/cat_{rid}_00.png"
    with Image.open(path) as im:
        assert im.size == (48, 32) and im.text == {"prompt": "a cat", "seed": "7"}
    stats = service.stats()
    assert stats["forget_images"] == before["forget_images"] + 1 and stats["forget_failed"] == before["forget_failed"]


def test_bad_inputs_fail_at_once_with_one_line_errors(ray_local, service):
    for latent, words in ((_latent(4, 4)[0], "rank 3"), (torch.randn(1, 32, 4, 4), "32 channels")):
        with pytest.raises(ConfigError) as e:
            service.decode(latent)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown decode mode"):
        service.decode(_latent(4, 4), mode="later")
    with pytest.raises(ConfigError, match="relative name"):
        service.decode(_latent(4, 4), mode="forget", save="/etc/x")
    # An error raised inside the actor comes back as the same one-line MeshError.
    actor = service.actors()[0]
    with pytest.raises(ConfigError) as e:
        Promise(actor.decode.remote(torch.randn(1, 3, 4, 4).numpy())[1]).result(60)
    assert "3 channels" in str(e.value) and "\n" not in str(e.value)


def test_killed_decoder_without_retries_fails_the_promise_and_next_request_restarts(ray_local, vae_file, tmp_path):
    with VaeService(vae_file, replicas=1, output_dir=tmp_path / "o", max_retries=0, **ACTOR_OPTS) as svc:
        svc.decode(_latent(4, 4), timeout=60)  # started and warm
        actor = svc.actors()[0]
        old_pid = ray.get(actor.info.remote(), timeout=30)["pid"]
        promise = svc.decode(_latent(160, 160, b=2), mode="promise", timeout=30)
        handle = promise.save(tmp_path / "never")
        _wait_until(lambda: ray.get(actor.info.remote(), timeout=30)["busy"] == 1, 30, "the decode to start")
        ray.kill(actor)
        with pytest.raises(ClusterError) as e:
            promise.result(timeout=30)
        assert "died" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ClusterError, match="died"):
            handle.result(timeout=30)
        assert not (tmp_path / "never").exists() or not list((tmp_path / "never").iterdir())  # no half file
        images = svc.decode(_latent(4, 4), timeout=60)
        assert images.shape == (1, 32, 32, 3)
        new_pid = ray.get(svc.actors()[0].info.remote(), timeout=30)["pid"]
        stats = svc.stats()
        assert new_pid != old_pid and stats["restarts"] == 1 and stats["failed"] == 1 and stats["retries"] == 0


def test_killed_decoder_with_pending_work_loses_nothing(ray_local, vae_file, tmp_path):
    """Kill a replica with promises, a wait and a forget request pending: every one completes on the
    other replica or the restarted one, equal to a local decode; files already written stay; no .tmp."""
    local = load_vae(vae_file)
    out = tmp_path / "promised"
    with VaeService(vae_file, replicas=2, output_dir=tmp_path / "forget", **ACTOR_OPTS) as svc:
        early = svc.decode(_latent(4, 4, seed=99), mode="promise", save=out, timeout=60)
        early_path = early.saved.result(60)[0]
        early_bytes = early_path.read_bytes()
        victim = svc.actors()[0]
        lats = [_latent(64, 64, seed=s) for s in range(6)]
        promises = [svc.decode(lat, mode="promise", save=out, timeout=300) for lat in lats]
        rid = svc.decode(_latent(48, 48, seed=7), mode="forget", save="runs/x")
        _wait_until(lambda: ray.get(victim.info.remote(), timeout=30)["busy"] == 1, 60, "replica 0 to start decoding")
        pending = svc.stats()["replicas"][0]["in_flight"]
        ray.kill(victim)
        waited = svc.decode(_latent(8, 8, seed=5), timeout=300)  # a wait-mode decode right after the kill
        assert torch.allclose(waited, local.decode(_latent(8, 8, seed=5)), atol=1e-5)
        for lat, p in zip(lats, promises):
            paths = p.saved.result(300)
            assert len(paths) == 1 and paths[0].is_file()
            assert torch.allclose(p.result(10), local.decode(lat), atol=1e-5)
        svc.drain(timeout=300)
        stats = svc.stats()
        assert pending >= 2 and stats["retries"] >= pending and stats["failed"] == 0, stats
        assert stats["forget_images"] == 1 and stats["forget_failed"] == 0
        assert (tmp_path / "forget" / "runs" / f"x_{rid}_00.png").is_file()
    assert early_path.read_bytes() == early_bytes  # written before the kill: kept as it was
    assert len(list(out.glob("*.png"))) == 7
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*"))


def test_idle_timeout_exits_and_comes_back_on_demand(ray_local, vae_file, tmp_path):
    with VaeService(vae_file, replicas=1, idle_timeout_s=1.0, output_dir=tmp_path, **ACTOR_OPTS) as svc:
        svc.decode(_latent(4, 4), timeout=60)
        actor = svc.actors()[0]

        def gone() -> bool:
            try:
                ray.get(actor.info.remote(), timeout=10)
                return False
            except RayActorError:
                return True

        _wait_until(gone, 30, "the idle actor to exit")
        images = svc.decode(_latent(4, 4), timeout=60)
        assert images.shape == (1, 32, 32, 3)
        assert svc.actors()[0] is not actor and svc.stats()["restarts"] == 1
        assert svc.replica_info()[0]["idle_timeout_s"] == 1.0
