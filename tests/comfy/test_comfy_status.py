"""The status light's data (comfy_integration.registry.status) for a real Mesh Split Model in ComfyUI."""

from __future__ import annotations

import comfy_host as h


def _lights():
    import ray

    from comfy_integration import registry

    def light(key):
        return next((s for s in registry.status()["splits"] if s["key"] == key), None)

    from comfy_integration import tiny

    model = tiny.tiny_patcher("flux2", seed=0)
    mesh, = h.run_node("MeshConnect", address="")
    split, = h.run_node("MeshSplitModel", model=model, mesh=mesh, n_blocks_remote=3, stages="", codec_mode="raw",
                        unique_id="41")
    tiny.sample(split, "flux2", steps=1)
    built = light("41")
    remote = h.remote_of(split)
    for seg in remote.group.remote:
        ray.kill(seg.actor, no_restart=True)
    dead = light("41")
    tiny.sample(split, "flux2", steps=1)  # the next queue re-creates the stages
    back = light("41")
    remote.close()
    closed = light("41")
    registry.record_split("42", None, "127.0.0.1:1", "double:0-single:3", "Ray at 127.0.0.1:1 is unreachable")
    failed = light("42")
    registry.forget_split("42")
    return {"built": built, "dead": dead, "back": back, "closed": closed, "failed": failed,
            "gone": light("42"), "keys": list(registry.status())}


def test_light_is_green_while_stages_live_red_when_one_died_grey_when_closed(comfy):
    got = comfy(_lights)
    b = got["built"]
    assert b["state"] == "green" and b["error"] is None and b["plan"]
    assert b["stages"] and all(s["alive"] for s in b["stages"])
    d = got["dead"]
    assert d["state"] == "red" and d["error"].startswith("stage ") and "queue the workflow again" in d["error"]
    assert got["back"]["state"] == "green"
    assert got["closed"]["state"] == "grey"
    f = got["failed"]
    assert f["state"] == "red" and f["error"] == "Ray at 127.0.0.1:1 is unreachable" and f["address"] == "127.0.0.1:1"
    assert got["gone"] is None and got["keys"] == ["address", "splits"]
