"""Mesh Split Model's life in a real ComfyUI: reconfigure without a restart, a stage killed in the
middle of sampling, stages closed when the node leaves the workflow (ComfyUI's own executor and
cache), two split nodes, a cluster too small for both, and bad inputs, each in one line."""

from __future__ import annotations

import comfy_host as h

FILE = "mesh-life-flux2.safetensors"


def _reconfigure():
    import ray

    from comfy_integration import tiny

    model = tiny.tiny_patcher("flux2", seed=0)
    ref = tiny.sample(model, "flux2")
    mesh, = h.run_node("MeshConnect", address="")
    runs, old = [], []
    for n in (1, 4, 2):  # up, then down, the same node between queues
        split, = h.run_node("MeshSplitModel", model=model, mesh=mesh, n_blocks_remote=n, stages="", codec_mode="raw",
                            unique_id="reconf")
        out = tiny.sample(split, "flux2")
        remote = h.remote_of(split)
        runs.append((n, tiny.max_diff(out, ref), [s["blocks"] for s in remote.group.info()]))
        old.append([s.actor for s in remote.group.remote])
    remote.close()
    dead = []
    for actors in old[:-1]:
        for a in actors:
            try:
                ray.get(a.ready.remote(), timeout=30)
                dead.append(False)
            except Exception:  # noqa: BLE001 - RayActorError: killed as it should be
                dead.append(True)
    return {"runs": runs, "old_dead": dead}


def test_reconfigure_up_and_down_between_queues(comfy):
    got = comfy(_reconfigure)
    assert [r[2] for r in got["runs"]] == [["single:2-2"], ["double:1-single:2"], ["single:1-2"]], got
    assert all(r[1] == 0.0 for r in got["runs"]), got
    assert got["old_dead"] and all(got["old_dead"]), got  # the stages of the previous plan were closed


def _killed_mid_sampling():
    import os
    import time

    import comfy.sample
    import folder_paths
    import nodes
    import ray

    from comfy_integration import tiny

    base = tiny.tiny_patcher("ltxav", seed=0)
    # With a LoRA before the node: the restarted stage comes back unpatched, and is patched again.
    lora = "mesh-lora-killed.safetensors"
    tiny.write_lora(base, os.path.join(folder_paths.get_folder_paths("loras")[0], lora),
                    ("transformer_blocks.2.", "transformer_blocks.3."))
    folder_paths.filename_list_cache.clear()
    model = nodes.LoraLoaderModelOnly().load_lora_model_only(base, lora, 1.0)[0]
    pos, neg, latent = tiny.inputs("ltxav")
    noise = comfy.sample.prepare_noise(latent["samples"], 5)

    def run(m, callback=None):
        return comfy.sample.sample(m, noise, 3, 3.0, "euler", "simple", pos, neg, latent["samples"], seed=5,
                                   callback=callback, disable_pbar=True)

    ref = run(model)
    mesh, = h.run_node("MeshConnect", address="")
    split, = h.run_node("MeshSplitModel", model=model, mesh=mesh, n_blocks_remote=0, stages="blocks:0-1; blocks:2-3",
                        codec_mode="raw", unique_id="killed")
    remote = h.remote_of(split)
    victim = remote.group.remote[1].actor
    pid = ray.get(victim.info.remote(), timeout=60)["pid"]
    killed = []

    def kill_after_first_step(step, *_):
        if step == 0 and not killed:  # between step 1 and step 2: the next call finds the stage dead
            ray.kill(victim, no_restart=False)
            end = time.monotonic() + 60
            while time.monotonic() < end:  # until the old process is gone (the kill is asynchronous)
                try:
                    if ray.get(victim.info.remote(), timeout=1.0)["pid"] != pid:
                        break
                except Exception:  # noqa: BLE001 - dead or restarting: gone
                    break
            killed.append(True)

    out = run(split, kill_after_first_step)
    info = remote.group.info()
    stats = {"restarts": remote.group.recovery.restarts, "retries": remote.group.recovery.retries,
             "builds": remote.builds, "pid_after": info[1]["pid"], "pid_before": pid, "ships": remote.patch_ships,
             "patched": [i["lora"] is not None for i in info], "lora_effect": tiny.max_diff(ref, run(base))}
    remote.close()
    return {"diff": tiny.max_diff(out, ref), "killed": bool(killed), **stats}


def test_stage_killed_mid_sampling_on_ltx_gives_the_same_video_and_audio(comfy):
    got = comfy(_killed_mid_sampling)
    assert got["killed"] and got["pid_after"] != got["pid_before"], got
    assert got["restarts"] >= 1 and got["retries"] >= 1 and got["builds"] == 1, got  # Ray restarted it, step retried
    # The set went from this process once; the group put it on the restarted stage again before the retry.
    assert got["ships"] == 1 and got["patched"] == [True, True], got
    assert got["lora_effect"] > 1e-3 and got["diff"] == 0.0, got


class _Server:
    """What ComfyUI's executor sends its events to (its web server in a running ComfyUI): kept here."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass


def _prompts():
    import gc
    import os

    import execution
    import folder_paths
    import nodes
    import ray

    from comfy_integration import tiny
    from comfy_integration.split_remote import live

    class TinySampler:  # a KSampler with the test conditioning (no text encoder here)
        CATEGORY, FUNCTION, OUTPUT_NODE, RETURN_TYPES = "test", "run", True, ("LATENT",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",)}}

        def run(self, model):
            pos, neg, latent = tiny.inputs("flux2")
            return nodes.common_ksampler(model, 3, 1, 3.0, "euler", "simple", pos, neg, latent)

    nodes.NODE_CLASS_MAPPINGS["MeshTestTinySampler"] = TinySampler
    h.node_class("MeshSplitModel")
    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], FILE)
    if not os.path.exists(path):
        tiny.write_tiny("flux2", path)
    folder_paths.filename_list_cache.clear()
    server = _Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0.0})

    def split_node(stages):
        return {"class_type": "MeshSplitModel", "inputs": {
            "model": ["1", 0], "mesh": ["2", 0], "n_blocks_remote": 0, "stages": stages, "codec_mode": "raw",
            "codec_qp": 18, "codec_lossless": False, "codec_tile_dim": 0, "forward_loras": True}}

    base = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": FILE, "weight_dtype": "default"}},
            "2": {"class_type": "MeshConnect", "inputs": {"address": ""}}}

    def run(prompt, outputs):
        executor.execute(prompt, f"p{len(prompt)}-{outputs}", {}, outputs)
        errors = [d.get("exception_message") for e, d in executor.status_messages if e == "execution_error"]
        gc.collect()  # what ComfyUI's prompt worker does between prompts
        return {"ok": executor.success, "errors": errors}

    def actors(key):
        remote = live(key)
        return [s.actor for s in remote.group.remote] if remote is not None and remote.group else []

    def alive(handles):
        out = []
        for a in handles:
            try:
                ray.get(a.ready.remote(), timeout=30)
                out.append(True)
            except Exception:  # noqa: BLE001 - killed
                out.append(False)
        return out

    got = {}
    two = {**base, "3": split_node("double:0-1; single:0-1 local"), "4": {"class_type": "MeshTestTinySampler", "inputs": {"model": ["3", 0]}},
           "5": split_node("single:0-1"), "6": {"class_type": "MeshTestTinySampler", "inputs": {"model": ["5", 0]}}}
    got["two"] = run(two, ["4", "6"])
    a3, a5 = actors("3"), actors("5")
    got["two_alive"] = alive(a3) + alive(a5)
    got["distinct"] = len({id(a) for a in a3 + a5}) == 2 and len(a3) == len(a5) == 1
    # The same graph again: ComfyUI's cache serves every node; the stages stay.
    got["again"] = run(two, ["4", "6"])
    got["again_same"] = actors("3") == a3 and actors("5") == a5
    # Node 5 left the workflow: its stages close when ComfyUI's cache drops its output; node 3's stay.
    one = {k: v for k, v in two.items() if k not in ("5", "6")}
    got["left"] = run(one, ["4"])
    got["after_left"] = {"3": alive(a3), "5": alive(a5), "5_live": live("5") is not None}
    # Too small for both: node 3 now asks for four stages, node 5 for four more (8 CPUs, the ComfyUI host holds one).
    wide = {**two, "3": split_node("double:0; double:1; single:0; single:1"),
            "5": split_node("double:0; double:1; single:0; single:1")}
    got["wide"] = run(wide, ["4", "6"])
    # Every split node gone: all stages close.
    a3 = actors("3")
    got["none"] = run({**base, "4": {"class_type": "MeshTestTinySampler", "inputs": {"model": ["1", 0]}}}, ["4"])
    got["after_none"] = alive(a3)
    return got


def test_split_nodes_in_comfyui_workflows_own_their_stages_and_close_them(comfy):
    got = comfy(_prompts)
    assert got["two"]["ok"] and got["two_alive"] == [True, True] and got["distinct"], got
    assert got["again"]["ok"] and got["again_same"], got
    assert got["left"]["ok"] and got["after_left"] == {"3": [True], "5": [False], "5_live": False}, got
    assert not got["wide"]["ok"], got
    (msg,) = got["wide"]["errors"]
    msg = msg.strip()  # ComfyUI's executor ends the message with a new line
    assert "split node 5 needs 4 stages" in msg and "split node 3 holds stages" in msg and "too small" in msg, msg
    assert "\n" not in msg, msg
    assert got["none"]["ok"] and got["after_none"] == [False] * len(got["after_none"]), got


def _bad_inputs(closed_port: int, other_comfy: str):
    import dataclasses

    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from comfy_integration import tiny
    from comfy_integration.comfy_env import ComfySource
    from mesh_ray.errors import MeshError

    def err(fn):
        try:
            fn()
        except MeshError as e:
            return str(e)
        return None

    model = tiny.tiny_patcher("flux2", seed=0)
    ltxv = comfy.supported_models.LTXV({"image_model": "ltxv", "num_layers": 1, "attention_head_dim": 8,
                                        "num_attention_heads": 2, "cross_attention_dim": 16, "caption_channels": 32,
                                        "in_channels": 128})
    other = comfy.model_patcher.ModelPatcher(ltxv.get_model({}, "", device=torch.device("meta")), mm.get_torch_device(),
                                             mm.unet_offload_device())
    mesh, = h.run_node("MeshConnect", address="")
    split = lambda m, **kw: h.run_node("MeshSplitModel", model=m, mesh=mesh, **{"n_blocks_remote": 0, "stages": "",
                                                                              "codec_mode": "raw", **kw})
    unreachable = err(lambda: h.run_node("MeshConnect", address=f"127.0.0.1:{closed_port}", timeout_s=5.0))
    still, = h.run_node("MeshConnect", address="")  # the working connection survived the bad address
    good, = split(model, n_blocks_remote=2, unique_id="bad-good")
    replaced = model.clone()  # another node already replaces a block that would go remote
    replaced.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "single_block", 2)
    # A worker whose ComfyUI is another version: the ComfyUI process's tree is not on its node, and the
    # one configured there (MESH_RAY_COMFYUI_PATH) is 0.3.64.
    elsewhere = dataclasses.replace(ComfySource.here(ship="never"), root="/nonexistent/comfyui")
    env = {"runtime_env": {"env_vars": {"MESH_RAY_COMFYUI_PATH": other_comfy}}}
    out = {
        "unsupported": err(lambda: split(other, n_blocks_remote=1)),
        "past_end": err(lambda: split(model, stages="single:1-7")),
        "too_many": err(lambda: split(model, n_blocks_remote=9)),
        "one_list_kind": err(lambda: split(tiny.tiny_patcher("wan"), stages="double:0-1")),
        "overlap": err(lambda: split(model, stages="double:1-single:1; single:1-2")),
        "gap": err(lambda: split(model, stages="double:0-0 local; single:0-2")),
        "replaced": err(lambda: split(replaced, n_blocks_remote=2)),
        "nothing": err(lambda: split(model)),
        "split_twice": err(lambda: split(good, n_blocks_remote=1)),
        "lossless_hevc": err(lambda: split(model, n_blocks_remote=1, codec_mode="hevc", codec_lossless=True)),
        "other_version": err(lambda: split(model, n_blocks_remote=1, unique_id="bad-version", source=elsewhere,
                                           actor_options=env)),
        "unreachable": unreachable,
    }
    h.remote_of(good).close()
    return {"errors": out, "same_mesh": still is mesh}


def test_bad_inputs_are_one_line_node_errors(comfy, comfyui_dir):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    other = comfyui_dir.parent / "comfyui"  # ComfyUI 0.3.64 beside 0.20
    got = comfy(_bad_inputs, port, str(other))
    errors = got["errors"]
    expect = {"unsupported": "cannot split a LTXV (LTXVModel) model: it splits FLUX.1, FLUX.2, LTX 2.x (LTXAV), "
                             "Wan 2.1/2.2, Qwen-Image",
              "past_end": "runs past the model", "too_many": "n_blocks_remote=9", "one_list_kind": "write blocks:A-B",
              "overlap": "overlaps", "gap": "leaves a gap", "replaced": "already replaces single_block 2",
              "nothing": "nothing to split", "split_twice": "already split", "lossless_hevc": "lossless",
              "other_version": "cannot import the ComfyUI process's ComfyUI 0.20.1",
              "unreachable": "cannot reach a Ray cluster at 127.0.0.1"}
    for name, text in expect.items():
        assert errors[name] and text in errors[name], (name, errors[name])
        assert "\n" not in errors[name], (name, errors[name])
    assert "0.3.64" in errors["other_version"] and "MESH_RAY_COMFYUI_PATH" in errors["other_version"], errors
    assert got["same_mesh"]
