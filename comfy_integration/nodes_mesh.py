"""MeshConnect and MeshSplitFlux: a Ray connection, and a FLUX.1 MODEL whose back blocks run on stages."""

from __future__ import annotations

import threading

from mesh_ray.codec import CodecSpec
from mesh_ray.config import SplitOptions
from mesh_ray.errors import MeshError
from mesh_ray.models.lora import digest

from .connection import live_mesh, mesh_for
from .flux_split import RemoteBlocks, compute_dtype, flux_config, flux_module, shard_file, split_clone
from .lora_patches import remote_lora_set
from .node_spec import mesh_node
from .plan import describe, plan_stages, remote_ranges

_live: dict[str, RemoteBlocks] = {}  # MeshSplitFlux node id -> its stages (closed when the node re-runs)
_live_lock = threading.Lock()


def close_all_splits() -> int:
    """Close the stages of every split node of this process (benchmarks, shutdown); how many there were."""
    with _live_lock:
        remotes = list(_live.values())
        _live.clear()
    for remote in remotes:
        remote.close()
    return len(remotes)


@mesh_node("connect", "Connect this ComfyUI process to Ray (embedded, or a cluster). Reused across queues.",
           [("MESH", "mesh", "The mesh-ray connection (a mesh_ray.Mesh) for MeshSplitFlux and MeshVAEDecode.")])
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


@mesh_node("split", "Split a FLUX.1 model: the back blocks run on Ray stage actors (any GPUs, any machines).",
           [("MODEL", "model", "The same model with its back blocks running on mesh-ray stages.")])
class MeshSplitFlux:
    """Run the back blocks of a FLUX.1 MODEL on stage actors; the front stays in ComfyUI."""

    INPUTS = {
        "required": {
            "model": ("MODEL", {"tooltip": "A FLUX.1 (dev/schnell) model. It stays unsplit for other nodes; "
                                "LoRAs loaded before this node reach the remote blocks."}),
            "mesh": ("MESH", {"tooltip": "The connection from MeshConnect."}),
            "n_blocks_remote": ("INT", {"default": 28, "min": 0, "max": 1000, "tooltip":
                                        "Run the last N blocks (of 57 in FLUX.1) on one remote stage. "
                                        "Ignored when a stages plan is given; 0 = use the plan."}),
            "stages": ("STRING", {"default": "", "multiline": True, "tooltip":
                                  "Several stages: block ranges in order, one per stage, e.g. "
                                  "'double:10-18; single:0-18; single:19-37'. Add 'local' to run a range "
                                  "here, '@IP' to pin it to a node. Blocks before the first range run here."}),
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
                                          "Apply the LoRAs loaded before this node on the remote blocks too "
                                          "(shipped once per LoRA set)."}),
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
              micro_batches: int = 1, unique_id: str | None = None) -> tuple:
        mesh = live_mesh(mesh)  # ComfyUI's cache may hand back a connection from before the cluster restarted
        dm = flux_module(model)
        config = flux_config(dm)
        specs = plan_stages(config.depth, config.depth_single_blocks, n_blocks_remote, stages)
        ranges = remote_ranges(specs, config.depth, config.depth_single_blocks)
        try:
            codec = CodecSpec(mode=codec_mode, qp=codec_qp, lossless=codec_lossless, tile_dim=codec_tile_dim or None)
        except ValueError as e:
            raise MeshError(f"bad codec settings ({str(e).splitlines()[-1].strip()}): lossless needs codec_mode "
                            f"quant8 or auto") from None
        dtype = compute_dtype(model)
        options = SplitOptions(dtype=dtype, codec=codec, micro_batches=micro_batches)
        key = str(unique_id if unique_id is not None else id(self))
        address = getattr(mesh.options, "address", None) or mesh.mode
        lset = remote_lora_set(model, ranges) if forward_loras else {}
        lora = (digest(lset) if lset else None, lset)
        shard = shard_file(model, config, ranges, dtype)
        with _live_lock:
            old = _live.pop(key, None)
        if old is not None and old.mesh is mesh and old.same_build(shard, specs, options):
            remote = old  # same model and plan (e.g. only a LoRA changed): keep the running stages
        else:
            if old is not None:
                old.close()  # reconfigured: the previous stages go before the new ones start
            remote = RemoteBlocks(key, mesh, shard, specs, options, describe(specs), address)
        with _live_lock:
            _live[key] = remote
        remote.use_lora(lora)  # start the stages and patch them now: a bad plan, cluster or LoRA is this node's error
        return (split_clone(model, remote, ranges, lora),)


NODE_CLASS_MAPPINGS = {"MeshConnect": MeshConnect, "MeshSplitFlux": MeshSplitFlux}
NODE_DISPLAY_NAME_MAPPINGS = {"MeshConnect": "Mesh Connect", "MeshSplitFlux": "Mesh Split FLUX"}
