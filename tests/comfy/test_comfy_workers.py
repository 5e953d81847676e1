"""Many ComfyUI workers, many frontends (issue 21), against real ComfyUI 0.20 servers and real Ray on
127.0.0.1: two worker actors and two frontends (ComfyUI servers with mesh-ray in custom_nodes) on a
cluster of their own (``frontends.RayHead``), prompts queued over HTTP (``POST /mesh/queue``) and
followed on the frontends' websockets.

The tests share one cluster and run in order: the worker-kill test leaves one worker, the last
test stops and restarts the cluster.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from frontends import (Browser, Driver, Frontend, RayHead, diffusion_prompt, image_prompt, latent, mesh_ray, pixels,
                       start_workers, write_tiny_model)


@pytest.fixture(scope="module")
def mesh(comfyui_dir, tmp_path_factory):
    from comfy_integration.comfy_env import tree_version

    if not tree_version(comfyui_dir).startswith("0.2"):
        pytest.skip(f"ComfyUI workers need ComfyUI 0.20 (COMFYUI_PATH is {tree_version(comfyui_dir)})")
    work = tmp_path_factory.mktemp("workers")
    tiny = write_tiny_model(work / "models" / "tiny.safetensors", seed=7)
    only_a = write_tiny_model(work / "models" / "only_a.safetensors", seed=11)
    head = RayHead(work)
    head.start()
    fa = Frontend(comfyui_dir, work / "frontA", head.address, {"tiny.safetensors": tiny, "only_a.safetensors": only_a})
    fb = Frontend(comfyui_dir, work / "frontB", head.address, {"tiny.safetensors": tiny})
    try:
        for fe in (fa, fb):
            from PIL import Image

            (fe.base / "input").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 48), (200, 40, 30)).save(fe.base / "input" / "red.png")
            fe.start()
        workers = start_workers(head, comfyui_dir, 2)["workers"]
        fa.wait_ready()
        fb.wait_ready()
        yield {"head": head, "A": fa, "B": fb, "workers": [w["name"] for w in workers], "comfyui": comfyui_dir,
               "only_a_size": only_a.stat().st_size}
    finally:
        for fe in (fa, fb):
            fe.stop()
        head.stop()


def _local(fe: Frontend, prompt: dict) -> dict:
    """Run a prompt in the frontend's own ComfyUI (``POST /prompt``): the plain local reference."""
    pid = fe.queue(prompt, route="/prompt")
    h = fe.wait_local(pid)
    assert h["status"]["status_str"] == "success", h["status"]
    return h


def _files(fe: Frontend, history: dict) -> list[Path]:
    return [fe.base / "output" / it["subfolder"] / it["filename"] for node in history["outputs"].values()
            for items in node.values() for it in items]


def _one_prompt_at_a_time(browser: Browser, pids: set[str]) -> None:
    """The browser saw each of its prompts from execution_start to its final `executing null`, never
    interleaved (local prompts queued without a client id are broadcast by ComfyUI: not counted)."""
    msgs = [(t, d) for t, d in browser.snapshot() if isinstance(d, dict) and d.get("prompt_id") in pids]
    current = None
    for t, d in msgs:
        if current is None:
            assert t == "execution_start", (t, d)
            current = d["prompt_id"]
        assert d["prompt_id"] == current, f"{t} of {d['prompt_id']} while {current} was on screen"
        if t == "executing" and d.get("node") is None:
            current = None


def test_two_frontends_queue_real_workflows_on_two_workers(mesh):
    A, B = mesh["A"], mesh["B"]
    code, js = A.get("/extensions/mesh-ray/mesh_queue.js")  # the "Queue on mesh" button is served
    assert code == 200 and b"actionBarButtons" in js and b"/mesh/queue" in js
    browsers = {"a": Browser(A), "b": Browser(B, preview_metadata=False)}  # B: a page without preview metadata
    jobs = []
    try:
        for fe, tag in ((A, "a"), (B, "b")):
            for i in range(2):
                p = diffusion_prompt("tiny.safetensors", seed=10 + i + 20 * (fe is B), steps=6, prefix=f"q{tag}{i}/d")
                jobs.append((fe, tag, fe.queue(p, browsers[tag].client_id, preview_method="latent2rgb"), p))
            p = image_prompt("red.png", f"q{tag}img/i")
            jobs.append((fe, tag, fe.queue(p, browsers[tag].client_id), p))
        done = {**A.wait_finished([j[2] for j in jobs if j[0] is A]),
                **B.wait_finished([j[2] for j in jobs if j[0] is B])}
        assert all(d["ok"] for d in done.values()), {p: d["error"] for p, d in done.items()}
        assert {d["worker"] for d in done.values()} == set(mesh["workers"])  # the work is spread over both

        for fe, tag, pid, prompt in jobs:
            h = fe.history(pid)
            assert h["status"]["status_str"] == "success"
            files = _files(fe, h)
            assert files and all(f.is_file() for f in files), files  # in the submitting frontend's folder
            other = B if fe is A else A
            assert not any((other.base / "output").glob(f"q{tag}*")), "outputs landed in the other frontend"
            # the same prompt in a plain local ComfyUI gives the same outputs
            local = {k: v for k, v in prompt.items()}
            for node in local.values():
                if "filename_prefix" in node["inputs"]:
                    node["inputs"] = {**node["inputs"], "filename_prefix": "local/" + node["inputs"]["filename_prefix"]}
            ref = _files(A, _local(A, local))
            assert len(ref) == len(files)
            for mine, theirs in zip(sorted(files, key=lambda f: f.suffix), sorted(ref, key=lambda f: f.suffix)):
                if mine.suffix == ".png":
                    assert pixels(mine) == pixels(theirs), mine
                else:
                    assert latent(mine).equal(latent(theirs)), mine

            br = browsers[tag]
            br.wait_for(pid, "executing")  # the final `executing null`
            kinds = [t for t, _ in br.of(pid)]
            assert kinds[0] == "execution_start" and kinds.count("execution_success") == 1
            assert kinds[-1] == "executing" and br.of(pid)[-1][1]["node"] is None
            steps = [d["value"] for t, d in br.of(pid) if t == "progress" and d.get("node") == "6"]
            if prompt["1"]["class_type"] == "UNETLoader":
                assert steps == sorted(steps) and steps[-1] == 6, steps  # progress in order, to the last step
                executed = [d for t, d in br.of(pid) if t == "executed"]
                assert {d["node"] for d in executed} == {"7", "9"}
                names = {it["filename"] for d in executed for items in d["output"].values() for it in items}
                assert names == {f.name for f in files}  # the UI is told the names the files have here
        for tag, br in browsers.items():
            _one_prompt_at_a_time(br, {pid for _, t, pid, _ in jobs if t == tag})
        kinds = {a["name"]: a.get("kind") for a in mesh_ray(mesh["head"], "status")["actors"]}
        assert all(kinds.get(w) == "comfy-worker" for w in mesh["workers"]), kinds  # `mesh-ray status` lists them
        # sampler previews come to each page in the form it asked for (4: with metadata, 1: plain)
        assert {d for t, d in browsers["a"].snapshot() if t == "binary"} == {4}
        assert {d for t, d in browsers["b"].snapshot() if t == "binary"} == {1}
    finally:
        for br in browsers.values():
            br.close()


def test_a_model_only_the_frontend_has_is_shipped_once(mesh):
    A = mesh["A"]
    first = A.queue(diffusion_prompt("only_a.safetensors", seed=1, steps=3, prefix="ship1/d"))
    d1 = A.wait_finished([first])[first]
    second = A.queue(diffusion_prompt("only_a.safetensors", seed=2, steps=3, prefix="ship2/d"))
    d2 = A.wait_finished([second])[second]
    assert d1["ok"] and d2["ok"], (d1, d2)
    assert d1["received_bytes"] == mesh["only_a_size"]  # shipped once (both workers share the node's cache)
    assert d2["received_bytes"] == 0  # then cached: the second prompt ships nothing
    nobody = A.queue(diffusion_prompt("nobody.safetensors", seed=1, steps=3, prefix="nobody/d"))
    d3 = A.wait_finished([nobody])[nobody]
    assert not d3["ok"] and "nobody.safetensors" in d3["error"] and "\n" not in d3["error"], d3
    assert A.history(nobody)["status"]["status_str"] == "error"


def test_fair_share_a_frontend_with_two_prompts_is_not_starved(mesh):
    A, B = mesh["A"], mesh["B"]
    many = [A.queue(diffusion_prompt("tiny.safetensors", seed=100 + i, steps=8, prefix=f"fair/a{i}")) for i in range(20)]
    t_b = time.time()
    few = [B.queue(diffusion_prompt("tiny.safetensors", seed=200 + i, steps=8, prefix=f"fair/b{i}")) for i in range(2)]
    done_b = B.wait_finished(few)
    assert all(d["ok"] for d in done_b.values())
    b_end = max(d["ended"] for d in done_b.values())
    done_a = A.wait_finished(many)
    assert all(d["ok"] for d in done_a.values())
    between = sum(1 for d in done_a.values() if t_b < d["ended"] <= b_end)
    after = sum(1 for d in done_a.values() if d["ended"] > b_end)
    # round-robin over two workers: B's two prompts wait for about two of A's, not for A's queue
    assert between <= 6 and after >= 4, f"A finished {between} prompts while B's 2 waited, {after} after them"


def test_the_ui_cancel_interrupts_the_worker(mesh):
    A = mesh["A"]
    br = Browser(A)
    try:
        pid = A.queue(diffusion_prompt("tiny.safetensors", seed=77, steps=10000, prefix="cancel/d"), br.client_id)
        br.wait_for(pid, "progress")
        assert A.post("/interrupt", {"prompt_id": pid})[0] == 200  # what the page's cancel button posts
        assert not A.wait_finished([pid], timeout=300)[pid]["ok"]
        br.wait_for(pid, "execution_interrupted")
        assert A.history(pid)["status"]["status_str"] == "error" and not A.output_files("cancel/")
    finally:
        br.close()


def test_a_frontend_that_goes_away_has_its_prompts_dropped(mesh, monkeypatch):
    """The frontend's helper process, driven over its socket as ComfyUI drives it; then the socket
    closes, as when ComfyUI exits: the dispatcher drops its prompts and the workers its input files."""
    from comfy_integration import queue_wire as wire
    from comfy_integration.prompt_files import client_dir, digest_of
    from comfy_integration.queue_bridge import QueueBridge
    from comfy_integration.worker import worker_home

    head, model = mesh["head"], mesh["A"].base / "models" / "diffusion_models" / "tiny.safetensors"
    monkeypatch.setenv("MESH_RAY_CACHE_DIR", head.env()["MESH_RAY_CACHE_DIR"])  # where the workers keep their files
    bridge = QueueBridge(head.address)
    driver = Driver(head)
    try:
        bridge.connect()
        models = [{"folder": "diffusion_models", "name": model.name, "digest": digest_of(str(model)),
                   "size": model.stat().st_size}]
        src = bridge_source(mesh["comfyui"])
        image = (mesh["A"].base / "input" / "red.png").read_bytes()
        jobs = {"leave-long": {"prompt": diffusion_prompt(model.name, 4, 10000, "leave/d"), "models": models},
                "leave-image": {"prompt": image_prompt("red.png", "leave/i"), "inputs": {"red.png": image}},
                "leave-queued": {"prompt": diffusion_prompt(model.name, 5, 10000, "leave/e"), "models": models}}
        for pid, job in jobs.items():
            bridge._send(wire.SUBMIT, pid, {**job, "prompt_id": pid, "comfy": src}, {models[0]["digest"]: str(model)}, None)
        homes = [worker_home(w) / "input" / "mesh-ray" / client_dir(bridge.client_id) for w in mesh["workers"]]
        end = time.monotonic() + 300
        runs: list = []
        while time.monotonic() < end:  # the image prompt ran (its input file is on a worker), the two long ones run
            runs = driver.call("runs", bridge.client_id)  # (an ended run the helper has read is forgotten)
            if [r["state"] for r in runs] == ["running", "running"] and any(h.is_dir() for h in homes):
                break
            time.sleep(0.5)
        assert [r["state"] for r in runs] == ["running", "running"] and any(h.is_dir() for h in homes), runs
        bridge.close()  # the frontend goes away
        end = time.monotonic() + 300
        while time.monotonic() < end:
            runs = driver.call("runs", bridge.client_id)
            if all(r["state"] in ("finished", "cancelled") for r in runs) and not any(
                    w["busy"] for w in driver.call("comfy_workers")):
                break
            time.sleep(0.5)
        assert [r["state"] for r in runs] == ["cancelled", "cancelled"], runs
        assert not any(h.exists() for h in homes)  # its input files went too
    finally:
        bridge.close()
        driver.close()


def bridge_source(comfyui: Path) -> dict:
    from comfy_integration.comfy_env import tree_digest, tree_version

    return {"version": tree_version(comfyui), "digest": tree_digest(str(comfyui.resolve()))}


def test_a_worker_killed_mid_prompt_runs_it_again_elsewhere(mesh):
    A = mesh["A"]
    killer = Driver(mesh["head"])
    br = Browser(A)
    try:
        prompt = diffusion_prompt("tiny.safetensors", seed=5, steps=600, prefix="kill/d")
        pid = A.queue(prompt, br.client_id)
        br.wait_for(pid, "progress")
        victim = A.status()["inflight"][pid]["worker"]
        killer.kill(victim)
        done = A.wait_finished([pid])[pid]
        assert done["ok"] and done["worker"] != victim and done["attempts"] == 2, done
        files = _files(A, A.history(pid))
        assert sorted(f.name for f in A.output_files("kill/")) == sorted(f.name for f in files)  # one result
        assert len(files) == 2
        ref = _files(A, _local(A, diffusion_prompt("tiny.safetensors", seed=5, steps=600, prefix="local/kill/d")))
        assert pixels(next(f for f in files if f.suffix == ".png")) == pixels(next(f for f in ref if f.suffix == ".png"))
        br.wait_for(pid, "executing")
        assert [t for t, _ in br.of(pid)].count("execution_success") == 1
    finally:
        br.close()
        killer.close()


def test_only_holders_of_the_cluster_token_can_queue(mesh, monkeypatch):
    """A frontend whose machine has another token than the cluster's is refused in one line."""
    from comfy_integration.queue_bridge import QueueBridge, QueueUnavailable

    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 32)
    bridge = QueueBridge(mesh["head"].address)
    try:
        with pytest.raises(QueueUnavailable) as e:
            bridge.connect(wait_s=300)
        assert "token" in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert bridge.status()["state"] == "down"
    finally:
        bridge.close()


def test_the_frontend_survives_the_cluster_stopping_mid_prompt(mesh):
    A, head = mesh["A"], mesh["head"]
    br = Browser(A)
    try:
        held = A.queue(diffusion_prompt("tiny.safetensors", seed=9, steps=1500, prefix="down/d"), br.client_id)
        br.wait_for(held, "progress")
        head.stop()  # the whole cluster: head, dispatcher, workers
        end = time.monotonic() + 120
        while A.status()["state"] != "down" and time.monotonic() < end:
            assert A.alive()
            time.sleep(0.5)
        st = A.status()
        assert st["state"] == "down" and "\n" not in st["message"] and head.address in st["message"], st
        code, body = A.post("/mesh/queue", {"prompt": diffusion_prompt("tiny.safetensors", 1, 2, "x/d")})
        assert code == 503 and "\n" not in body["error"]["message"], body
        assert A.alive() and A.get("/system_stats")[0] == 200  # ComfyUI itself kept running
        head.start()  # the cluster comes back on the same address
        start_workers(head, mesh["comfyui"], 1)
        done = A.wait_finished([held], timeout=900)[held]
        assert done["ok"], done  # the prompt in flight ran once the cluster was back: nothing lost
        again = A.queue(diffusion_prompt("tiny.safetensors", seed=3, steps=2, prefix="back/d"))
        assert A.wait_finished([again])[again]["ok"]
        assert A.alive()
        assert mesh_ray(head, "comfy", "workers", "--stop")["stopped"] == ["mesh-ray/comfy-worker-0"]
        assert not [a for a in mesh_ray(head, "status")["actors"] if a.get("kind") == "comfy-worker"]
    finally:
        br.close()
