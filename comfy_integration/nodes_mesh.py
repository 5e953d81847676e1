"""MeshConnect and Mesh Split Model: a Ray connection, and a MODEL whose blocks run on stage actors
with ComfyUI's own block code (FLUX.1, FLUX.2, LTX 2.x, Wan 2.1/2.2, Qwen-Image)."""

from __future__ import annotations

from typing import Any

from mesh_ray.codec import CodecSpec
from mesh_ray.config import SplitOptions
from mesh_ray.errors import ConfigError, MeshError

from .archs import detect, supported
from .comfy_env import ComfySource
from .connection import live_mesh, mesh_for
from .node_spec import mesh_node
from .plan import describe, plan_stages, remote_ranges
from .split_clone import (MARK, compute_dtype, layout_of, memory_shard, model_file, model_spec, patch_digest,
                          remote_patches, split_clone, weights_id)
from .split_remote import RemoteBlocks, close_all_splits, live, remember


@mesh_node("connect", "Connect this ComfyUI process to Ray (embedded, or a cluster). Reused across queues.",
           [("MESH", "mesh", "The mesh-ray connection (a mesh_ray.Mesh) for Mesh Split Model and MeshVAEDecode.")])
class MeshConnect:
    """A connection to Ray: embedded in this ComfyUI process, or a cluster; one per process, reused."""

    INPUTS = {
        "required": {
            "address": ("STRING", {"default": "", "tooltip": "Empty: an embedded Ray in this ComfyUI process. "
                                   "'auto': the Ray started with `ray start` on this machine. 'host:port': "
                                   "a cluster's head (e.g. 10.0.0.5:6379)."}),
        },
        "optional": {
            "namespace": ("STRING", {"default": "mesh-ray", "tooltip": "Ray namespace for this ComfyUI's "
                                     "actors; give each ComfyUI sharing a cluster its own."}),
            "timeout_s": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 600.0, "step": 1.0,
                                    "tooltip": "How long to wait for the cluster before the node fails."}),
        },
    }

    def connect(self, address: str, namespace: str = "mesh-ray", timeout_s: float = 30.0) -> tuple:
        return (mesh_for(address, namespace, timeout_s),)


@mesh_node("split", f"Split a diffusion model ({supported()}): its blocks run on Ray stage actors (any GPUs, any "
                    f"machines) with ComfyUI's own block code, bit for bit as unsplit.",
           [("MODEL", "model", "The same model with its remote blocks running on mesh-ray stages.")])
class MeshSplitModel:
    """Run blocks of a MODEL on stage actors; the rest stays in ComfyUI."""

    INPUTS = {
        "required": {
            "model": ("MODEL", {"tooltip": f"A {supported()} model. It stays unsplit for other nodes; "
                                "LoRAs loaded before this node reach the remote blocks."}),
            "mesh": ("MESH", {"tooltip": "The connection from MeshConnect."}),
            "n_blocks_remote": ("INT", {"default": 28, "min": 0, "max": 1000, "tooltip":
                                        "Run the last N blocks on one remote stage (FLUX.1: 57 blocks, FLUX.2 Dev: "
                                        "56, LTX 2.3: 48, Wan 14B: 40, Qwen-Image: 60). Ignored when a stages plan "
                                        "is given; 0 = use the plan."}),
            "stages": ("STRING", {"default": "", "multiline": True, "tooltip":
                                  "Several stages: block ranges in order, one per stage, e.g. FLUX "
                                  "'double:10-18; single:0-18; single:19-37', LTX/Wan/Qwen 'blocks:24-35; "
                                  "blocks:36-47'. Add 'local' to run a range here, '@IP' to pin it to a node. "
                                  "Blocks before the first range run here."}),
            "codec_mode": (["auto", "raw", "quant8", "hevc"], {"default": "auto", "tooltip":
                           "How activations travel between processes: auto = raw on one machine, "
                           "compressed across machines; raw = exact."}),
            "codec_qp": ("INT", {"default": 18, "min": 0, "max": 51, "tooltip":
                                 "HEVC quantisation (lower = closer to exact, more bytes)."}),
            "codec_lossless": ("BOOLEAN", {"default": False, "tooltip":
                                           "quant8 only: code the exact bits (byte-exact, less compression)."}),
            "codec_tile_dim": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip":
                                       "HEVC channel tiles per frame side; 0 picks one."}),
            "forward_loras": ("BOOLEAN", {"default": True, "tooltip":
                                          "Apply the LoRAs and other weight patches loaded before this node on the "
                                          "remote blocks too (ComfyUI's own patch code; shipped once per set)."}),
        },
        "optional": {
            "micro_batches": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                                      "Cut each batch (e.g. CFG's two halves) into this many pieces that "
                                      "overlap across several stages."}),
        },
        "hidden": {"unique_id": "UNIQUE_ID"},
    }

    def split(self, model, mesh, n_blocks_remote: int = 28, stages: str = "", codec_mode: str = "auto",
              codec_qp: int = 18, codec_lossless: bool = False, codec_tile_dim: int = 0, forward_loras: bool = True,
              micro_batches: int = 1, unique_id: str | None = None, source: ComfySource | None = None,
              actor_options: dict | None = None) -> tuple:
        """The split MODEL.  ``source`` (the ComfyUI the stages import; default this process's) and
        ``actor_options`` (more Ray options for the stage actors) are for embedding and tests."""
        mesh = live_mesh(mesh)  # ComfyUI's cache may hand back a connection from before the cluster restarted
        arch = detect(model)
        if MARK in model.model_options.get("transformer_options", {}):
            raise ConfigError("this MODEL is already split by a Mesh Split Model node: connect the unsplit model instead")
        layout = layout_of(model, arch)
        specs = plan_stages(layout, n_blocks_remote, stages)
        ranges = remote_ranges(specs, layout)
        try:
            codec = CodecSpec(mode=codec_mode, qp=codec_qp, lossless=codec_lossless, tile_dim=codec_tile_dim or None)
        except ValueError as e:
            raise MeshError(f"bad codec settings ({str(e).splitlines()[-1].strip()}): lossless needs codec_mode "
                            f"quant8 or auto") from None
        options = SplitOptions(dtype=compute_dtype(model), codec=codec, micro_batches=micro_batches)
        key = str(unique_id if unique_id is not None else id(self))
        address = getattr(mesh.options, "address", None) or mesh.mode
        prefixes = tuple(p for r in ranges for p in layout.prefixes(r))
        path, prefix = model_file(model, prefixes)
        spec = model_spec(model, arch, (source or ComfySource.here()).for_actors(), prefix)
        wid = weights_id(model, path)
        entries = remote_patches(model, prefixes) if forward_loras else {}
        old = live(key)
        if old is not None and old.mesh is mesh and old.same_build(spec, specs, options, path, wid):
            remote = old  # same model and plan (e.g. only a LoRA changed): keep the running stages
            remote.options = options
        else:
            if old is not None:
                old.close()  # reconfigured: the previous stages go before the new ones start
            remote = RemoteBlocks(key, mesh, arch, spec, layout, specs, options, path, memory_shard(model), wid,
                                  address, describe(specs), actor_options)
            remember(remote)
        remote.set_patches(entries, patch_digest(entries))
        remote.use_patches()  # start the stages and patch them now: a bad plan, cluster or LoRA is this node's error
        chains = [[(kind, i) for kind, _, i in (layout.locate(b) for seg in chain for b in seg.range)]
                  for chain in remote.group.chains()]
        return (split_clone(model, remote, ranges, chains),)


class MeshSplitFlux(MeshSplitModel):
    """The node's first id: saved workflows that name it load as Mesh Split Model (same inputs)."""

    DEPRECATED = True


def remote_of(model: Any) -> RemoteBlocks | None:
    """The RemoteBlocks behind a MODEL that a split node returned (tests, benchmarks)."""
    mark = model.model_options.get("transformer_options", {}).get(MARK)
    return live(mark["key"]) if mark else None


NODE_CLASS_MAPPINGS = {"MeshConnect": MeshConnect, "MeshSplitModel": MeshSplitModel, "MeshSplitFlux": MeshSplitFlux}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshConnect": "Mesh Connect", "MeshSplitModel": "Mesh Split Model",
                              "MeshSplitFlux": "Mesh Split Model (old id: Mesh Split FLUX)"}
__all__ = ["MeshConnect", "MeshSplitFlux", "MeshSplitModel", "close_all_splits", "remote_of"]
