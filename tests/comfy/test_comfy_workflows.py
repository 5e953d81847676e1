"""comfy_integration/workflows: each API-format graph passes ComfyUI's own prompt validation, and its
UI-format graph turns into exactly that API graph (widgets in ComfyUI's order, links intact).
FLUX.1 with a LoRA and promised images (saved with the node's first id, MeshSplitFlux), FLUX.2 Klein,
and LTX 2.3 video with audio (both Mesh Split Model)."""

from __future__ import annotations

import json

import pytest

import comfy_host as h
from comfy_host import REPO

WORKFLOWS = REPO / "comfy_integration" / "workflows"
LINK_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# workflow -> the model files it names (folder, name): empty stand-ins, as validation checks names only
FILES = {
    "flux1_split_lora_promise": [("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                                 ("text_encoders", "t5xxl_fp16.safetensors"), ("loras", "flux1_style_lora.safetensors"),
                                 ("vae", "ae.safetensors")],
    "flux2_klein_split": [("diffusion_models", "flux-2-klein-4b.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
                          ("vae", "flux2-vae.safetensors")],
    "ltx23_split_av": [("checkpoints", "ltx-2.3-22b-dev.safetensors"), ("text_encoders", "gemma_3_12B_it.safetensors")],
}


def _input_types(class_type: str) -> dict:
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    types = cls.INPUT_TYPES()
    return {k: v for part in ("required", "optional") for k, v in types.get(part, {}).items()}


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in LINK_TYPES


def _has_control(spec) -> bool:
    return len(spec) > 1 and bool(spec[1].get("control_after_generate"))


def ui_to_api(ui: dict) -> dict:
    """What ComfyUI's page sends for a UI-format graph (its graphToPrompt, for plain graphs)."""
    links = {l[0]: l for l in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, spec in _input_types(node["type"]).items():
            if _is_widget(spec):
                inputs[name] = values.pop(0)
                if _has_control(spec):
                    values.pop(0)
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                assert link[3] == node["id"], f"link {link} does not end at node {node['id']}"
                inputs[inp["name"]] = [str(link[1]), link[2]]
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


def _check_workflows(api: dict, ui: dict, files: list):
    import asyncio
    import os

    import execution
    import folder_paths
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))  # FluxGuidance etc.
    h.node_class("MeshSplitModel")  # our package, loaded from custom_nodes
    # The files the graph names, as empty stand-ins: validation checks names against the folders.
    base = os.path.dirname(folder_paths.get_folder_paths("diffusion_models")[0])  # the host's temp folder
    for folder, name in files:
        os.makedirs(os.path.join(base, folder), exist_ok=True)
        folder_paths.add_model_folder_path(folder, os.path.join(base, folder), is_default=True)
        open(os.path.join(base, folder, name), "wb").close()
    folder_paths.filename_list_cache.clear()
    valid = asyncio.run(execution.validate_prompt("wf", api, None))
    return {"ok": valid[0], "error": valid[1], "node_errors": valid[3], "from_ui": ui_to_api(ui)}


def _check(call, name: str) -> dict:
    api = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    got = call(_check_workflows, api, ui, FILES[name])
    got["api"] = api
    return got


def test_flux1_workflow_validates_in_each_comfyui_and_ui_matches_api(comfy_each):
    got = _check(comfy_each, "flux1_split_lora_promise")
    assert got["ok"], (got["error"], got["node_errors"])
    assert got["from_ui"] == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in got["api"].items()}


@pytest.mark.parametrize("name", ["flux2_klein_split", "ltx23_split_av"])
def test_workflows_validate_in_comfyui_and_ui_matches_api(comfy, name):
    got = _check(comfy, name)
    api = got["api"]
    assert got["ok"], (got["error"], got["node_errors"])
    assert got["from_ui"] == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
