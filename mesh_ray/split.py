"""A FLUX transformer split over stages: same call, same result as the single-process forward.

The caller keeps the embedders and the final layer (and any block range marked ``local``);
every other range runs on a stage actor.  Consecutive remote stages hand activations to each
other as ObjectRefs, so the caller is not on the data path.  Per-generation constants (rotary
``pe``, the text tokens when the first stage starts at block 0) are put in the object store once
and cached on the stages by generation id; per-step conditioning is sent raw.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from mesh_ray.actors.shards import default_cache_dir, send_shard
from mesh_ray.actors.stage import StageActor, StageInit, move_cond
from mesh_ray.actors.wire import pack_state, unpack_state, with_cached_text
from mesh_ray.codec import CodecSpec, choose_spec
from mesh_ray.cluster import cluster_gpus, explain_unschedulable, node_affinity
from mesh_ray.config import SplitOptions, StageSpec, load_settings, validate
from mesh_ray.errors import ClusterError, ConfigError, MeshError, StageError
from mesh_ray.models.blocks import BlockRange, check_cover
from mesh_ray.models.checkpoint import CheckpointInfo, inspect, load_blocks
from mesh_ray.models.flux import BlockCond, BlockState, Flux, build

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Segment:
    """A block range and who runs it: ``actor`` None means the calling process."""

    range: BlockRange
    spec: StageSpec
    actor: Any = None
    index: int = -1
    node_id: str | None = None
    in_spec: CodecSpec | None = None  # codec of the link into this stage
    in_link: str = ""
    out: dict = field(default_factory=dict)  # what the stage needs for its outgoing link: spec and name


@dataclass
class _Flight:
    """One micro-batch moving through the segments."""

    state: Any  # BlockState, or an ObjectRef of a WireState
    cond: BlockCond
    gen: dict
    cond_host: BlockCond | None = None  # the same conditioning on the host, for stage calls
    cursor: int = 0
    transfers: list = field(default_factory=list)


@dataclass
class StepStats:
    """What the last forward moved: one entry per hop (link, mode, raw/wire bytes, encode/decode ms)."""

    transfers: list = field(default_factory=list)
    ms: float = 0.0

    @property
    def hops(self) -> int:
        return len(self.transfers)

    @property
    def bytes(self) -> int:
        """Bytes on the wire for all hops."""
        return sum(t["wire_bytes"] for t in self.transfers)

    @property
    def raw_bytes(self) -> int:
        """What the same hops would have carried uncoded."""
        return sum(t["raw_bytes"] for t in self.transfers)


def _tensor_key(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SplitModel:
    """Callable like ``Flux.forward``; built by ``Mesh.split`` (see there for the arguments)."""

    def __init__(self, checkpoint: str, stages: list[StageSpec], options: SplitOptions, info: CheckpointInfo,
                 load_local: bool = True):
        self.checkpoint = checkpoint
        self.info = info
        self.config = info.config
        self.options = options
        self.id = uuid.uuid4().hex[:8]
        gpu = torch.cuda.is_available()
        self.dtype = _DTYPES[options.dtype or ("bfloat16" if gpu else "float32")]
        self.device = torch.device("cuda" if gpu else "cpu")
        ranges = [info.range(s.blocks, f"stage {i} block range") for i, s in enumerate(stages)]
        check_cover(ranges)
        self.segments = [Segment(r, s, index=i) for i, (r, s) in enumerate(zip(ranges, stages))]
        self.last = StepStats()
        self._gen_refs: OrderedDict[str, dict] = OrderedDict()
        self._pg = None
        self._closed = False
        self._cluster_gpus = cluster_gpus()
        # The caller's part: embedders, final layer, and blocks of local segments only (none when
        # the caller has its own model and uses only block_patches(), as inside ComfyUI).
        self.model = build(self.config, "meta", self.dtype)
        if load_local:
            local = [s.range for s in self.segments if s.spec.local]
            sd = load_blocks(checkpoint, local, non_block=True, dtype=self.dtype, info=info)
            self.model.load_state_dict(sd, strict=False, assign=True)
            self._to_device(local)
        try:
            self._start_stages()
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------------------------

    def _to_device(self, local: list[BlockRange]) -> None:
        for name, mod in self.model.named_children():
            if name not in ("double_blocks", "single_blocks"):
                mod.to(self.device)
        for r in local:
            for b in r:
                self.model.block(b).to(self.device)

    def _num_gpus(self, spec: StageSpec) -> float:
        """GPUs a stage asks for: its own setting, else one when the cluster has GPUs."""
        return spec.num_gpus if spec.num_gpus is not None else (1.0 if self._cluster_gpus >= 1 else 0.0)

    def _stage_options(self, seg: Segment, bundle: int | None) -> dict:
        spec = seg.spec
        opts: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": self._num_gpus(spec),
                                "name": f"mesh-ray/{self.id}/stage{seg.index}", "max_restarts": 0}
        if spec.node:
            opts["scheduling_strategy"] = node_affinity(spec.node)
        elif self._pg is not None and bundle is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=bundle)
        return opts

    def _make_placement_group(self, remote: list[Segment]) -> None:
        if self.options.placement == "none" or not remote:
            return
        from ray.util.placement_group import placement_group

        bundles = []
        for seg in remote:
            need = {"CPU": seg.spec.num_cpus, "GPU": self._num_gpus(seg.spec)}
            bundles.append({k: v for k, v in need.items() if v} or {"CPU": 0.01})
        self._pg = placement_group(bundles, strategy=self.options.placement.upper())
        try:
            ray.get(self._pg.ready(), timeout=self.options.start_timeout_s)
        except GetTimeoutError:
            raise ClusterError(f"the {len(bundles)} stages cannot be placed with placement={self.options.placement} "
                               f"(bundles {bundles}, {len(ray.nodes())} nodes): add nodes or use placement='pack' "
                               f"or 'spread'") from None

    def _start_stages(self) -> None:
        remote = [s for s in self.segments if not s.spec.local]
        self._make_placement_group(remote)
        cache_dir = self.options.cache_dir or default_cache_dir()
        for k, seg in enumerate(remote):
            init = StageInit(index=seg.index, config=self.config, start=seg.range.start, stop=seg.range.stop,
                             checkpoint_path=seg.spec.checkpoint_path or self.checkpoint,
                             dtype=str(self.dtype).removeprefix("torch."), cache_dir=cache_dir,
                             torch_threads=seg.spec.torch_threads or self.options.torch_threads
                             or (torch.get_num_threads() if self.device.type == "cpu" else None),
                             offload=self.options.offload)
            seg.actor = StageActor.options(**self._stage_options(seg, k)).remote(init)
        for seg in remote:
            need = {"CPU": seg.spec.num_cpus, "GPU": self._num_gpus(seg.spec)}
            try:
                ray.get(seg.actor.ready.remote(), timeout=self.options.start_timeout_s)
            except GetTimeoutError:
                raise ClusterError(explain_unschedulable(need, f"stage {seg.index} ({seg.range})")) from None
        loads = [self._load(seg) for seg in remote]
        for seg, ref in zip(remote, loads):
            seg.node_id = self._get(ref, seg, self.options.start_timeout_s, "loading its blocks")["node_id"]
        self._plan_links()

    def _plan_links(self) -> None:
        """Resolve the codec spec of every link from where its two ends run (auto: raw on one node)."""
        here = ray.get_runtime_context().get_node_id()
        segs = self.segments
        for i, seg in enumerate(segs):
            if seg.spec.local:
                continue
            prev = segs[i - 1] if i > 0 and not segs[i - 1].spec.local else None
            nxt = segs[i + 1] if i + 1 < len(segs) and not segs[i + 1].spec.local else None
            seg.in_spec = choose_spec(self.options.codec, same_node=(prev.node_id if prev else here) == seg.node_id)
            seg.in_link = f"{f'stage{prev.index}' if prev else 'caller'}->stage{seg.index}"
            seg.out = {"spec": choose_spec(self.options.codec, same_node=(nxt.node_id if nxt else here) == seg.node_id),
                       "link": f"stage{seg.index}->{f'stage{nxt.index}' if nxt else 'caller'}"}

    def _load(self, seg: Segment) -> Any:
        """Load from the worker's own file when it can read it, else ship the shard once."""
        readable = self._get(seg.actor.can_read_checkpoint.remote(), seg, 60, "checking the checkpoint")
        if readable and self.options.ship != "always":
            return seg.actor.load_from_file.remote()
        if self.options.ship == "never":
            raise StageError(f"stage {seg.index} cannot read {seg.spec.checkpoint_path or self.checkpoint} on its "
                             f"node and ship='never': copy the file there, set checkpoint_path, or allow ship='auto'")
        sd = load_blocks(self.checkpoint, [seg.range], info=self.info)
        return send_shard(seg.actor, sd, lambda ref, doing: self._get(ref, seg, 60, doing))

    def _get(self, ref: Any, seg: Segment | None, timeout: float, doing: str) -> Any:
        where = f"stage {seg.index} ({seg.range})" if seg else "a stage"
        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            raise StageError(f"{where} did not finish {doing} within {timeout:.0f}s: check the worker with "
                             f"`mesh-ray status`, or raise step_timeout_s / start_timeout_s") from None
        except RayActorError as e:
            raise StageError(f"{where} died while {doing} ({type(e).__name__}): its worker crashed or its node left; "
                             f"create the split again with mesh.split(...)") from None
        except RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
            if isinstance(cause, MeshError):
                raise type(cause)(str(cause)) from None
            msg = str(cause or e).strip().splitlines()[-1]
            raise StageError(f"{where} failed while {doing}: {msg}: see the worker log for the traceback") from None

    # -- forward --------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward(*args, **kwargs)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        """Same signature and result as ``Flux.forward``; a batch is cut into ``micro_batches``."""
        if self._closed:
            raise MeshError("this split was closed: create a new one with mesh.split(...)")
        t0 = time.perf_counter()
        opts = transformer_options or {}
        gen_id = opts.get("mesh_generation")
        n = min(self.options.micro_batches, img.shape[0])
        bounds = [round(i * img.shape[0] / n) for i in range(n + 1)]
        flights = []
        with torch.inference_mode():
            for i in range(n):
                sl = slice(bounds[i], bounds[i + 1])
                args = [a[sl] if a is not None else None for a in (img, img_ids, txt, txt_ids, timesteps, y, guidance)]
                args = [a.to(self.device) if a is not None else None for a in args]
                args[0], args[2] = args[0].to(self.dtype), args[2].to(self.dtype)
                self.model.check_inputs(*args)
                cond = self.model.conditioning(args[4], args[5], args[6], dtype=self.dtype)
                key = f"{gen_id}:{i}/{n}:{bounds[i]}-{bounds[i + 1]}" if gen_id else _tensor_key(args[1], args[2], args[3])
                gen, state = self._generation(key, args, cond)
                flights.append(_Flight(state=state, cond=cond, gen=gen, cond_host=_cpu_cond(cond)))
            self._run(flights)
            out = torch.cat([self.model.finish(f.state, f.cond) for f in flights], dim=0)
        self.last = StepStats([t for f in flights for t in f.transfers], (time.perf_counter() - t0) * 1000)
        return out

    def _generation(self, key: str, args: list, cond: BlockCond) -> tuple[dict, BlockState]:
        """Embed one micro-batch; put pe (and unchanged text tokens) in the object store once per generation."""
        img, img_ids, txt, txt_ids = args[:4]
        state = BlockState(self.model.img_in(img), None, txt.shape[1])
        first = self.segments[0]
        cache_txt = not first.spec.local and first.range.start == 0
        if key not in self._gen_refs:
            pe = self.model.embed_positions(img_ids, txt_ids)
            txt_emb = self.model.embed_text(txt)
            self._gen_refs[key] = {"id": key, "pe": [ray.put(pe.cpu())], "txt": [ray.put(txt_emb.cpu())] if cache_txt else None,
                                   "grid": _grid(img_ids), "pe_local": pe, "txt_local": txt_emb}
            while len(self._gen_refs) > 4 * max(1, self.options.micro_batches):
                self._gen_refs.popitem(last=False)
        g = self._gen_refs[key]
        self._gen_refs.move_to_end(key)
        txt_tokens = g["txt_local"]
        state = BlockState(state.img, txt_tokens[:, :0] if cache_txt else txt_tokens, state.txt_len)
        return {"id": key, "pe": g["pe"], "txt": g["txt"], "grid": g["grid"],
                "pe_local": g["pe_local"], "txt_local": txt_tokens}, state

    def _run(self, flights: list[_Flight]) -> None:
        """Advance every micro-batch: local segments here, remote chains submitted without waiting."""
        pending = list(range(len(flights)))
        while pending:
            for i in pending:
                self._advance(flights[i])
            for i in pending:
                f = flights[i]
                if isinstance(f.state, ray.ObjectRef):
                    seg = self.segments[f.cursor - 1]
                    wire = self._get(f.state, seg, self.options.step_timeout_s, "a forward step")
                    f.state, hops = unpack_state(wire, self.device)
                    f.transfers.extend(hops)
            pending = [i for i in pending if flights[i].cursor < len(self.segments)]

    def _advance(self, f: _Flight) -> None:
        gen_remote = {"id": f.gen["id"], "pe": f.gen["pe"], "txt": f.gen["txt"], "grid": f.gen["grid"]}
        while f.cursor < len(self.segments):
            seg = self.segments[f.cursor]
            if seg.spec.local:
                if isinstance(f.state, ray.ObjectRef):
                    return
                state = with_cached_text(f.state, f.gen["txt_local"])
                f.state = self.model.run_blocks(state, f.cond, f.gen["pe_local"], seg.range.start, seg.range.stop)
            else:
                if isinstance(f.state, BlockState):
                    f.state = pack_state(f.state, seg.in_spec, f.gen["grid"], seg.in_link)
                f.state = seg.actor.forward.remote(f.state, f.cond_host, gen_remote, seg.out)
            f.cursor += 1
            if isinstance(f.state, ray.ObjectRef) and (f.cursor >= len(self.segments) or self.segments[f.cursor].spec.local):
                return

    # -- block replacement for a foreign forward (e.g. ComfyUI's own FLUX model) ----------------

    def block_patches(self) -> dict:
        """``patches_replace["dit"]`` entries that run this split's remote ranges in any forward
        that supports ComfyUI-style block replacement (ours included)."""
        patches: dict = {}
        depth = self.config.depth
        i = 0
        while i < len(self.segments):
            if self.segments[i].spec.local:
                i += 1
                continue
            j = i
            while j + 1 < len(self.segments) and not self.segments[j + 1].spec.local:
                j += 1
            chain = self.segments[i : j + 1]
            first, stop = chain[0].range.start, chain[-1].range.stop
            for b in range(first, stop):
                key = ("double_block", b) if b < depth else ("single_block", b - depth)
                patches[key] = self._chain_patch(chain, first) if b == first else _passthrough
            i = j + 1
        return patches

    def _chain_patch(self, chain: list[Segment], first: int):
        """One patch that runs a chain of remote stages.  ``args`` as ComfyUI's FLUX.1 forward passes
        them (img, txt, vec, pe, attn_mask, transformer_options) or as ours does (plus ``cond``)."""
        def run(args: dict, _extra: dict) -> dict:
            if self._closed:
                raise MeshError("this split was closed: create a new one with mesh.split(...)")
            if args.get("attn_mask") is not None:
                raise ConfigError("an attention mask reached a remote block range: remote stages run unmasked "
                                  "attention; drop the masking node or keep these blocks local")
            img, pe = args["img"], args["pe"]
            cond = _cpu_cond(_patch_cond(args, self.dtype))
            b = img.shape[0]
            n = min(self.options.micro_batches, b)  # e.g. CFG's two halves pipelined over the stages
            bounds = [round(i * b / n) for i in range(n + 1)]
            refs = []
            for i in range(n):
                sl = slice(bounds[i], bounds[i + 1])
                gen = self._patch_generation(pe if pe.shape[0] == 1 else pe[sl])
                if first < self.config.depth:
                    txt = args["txt"][sl]
                    state = BlockState(img[sl].to("cpu", self.dtype), txt.to("cpu", self.dtype), txt.shape[1])
                else:  # joined stream; the text length only matters to a caller that unjoins
                    state = BlockState(img[sl].to("cpu", self.dtype), None, 0)
                ref = pack_state(state, chain[0].in_spec, None, chain[0].in_link)
                part = cond if n == 1 else _slice_cond(cond, sl)
                for seg in chain:  # submitted without waiting: micro-batch i+1 enters as i moves on
                    ref = seg.actor.forward.remote(ref, part, gen, seg.out)
                refs.append(ref)
            outs, hops = [], []
            for ref in refs:
                out, h = unpack_state(self._get(ref, chain[-1], self.options.step_timeout_s, "a patched block range"),
                                      img.device)
                outs.append(out.unjoin() if first < self.config.depth else out.join())
                hops.extend(h)
            self.last = StepStats(hops)
            res = {"img": torch.cat([o.img for o in outs]).to(img.device, img.dtype)}
            if first < self.config.depth:
                res["txt"] = torch.cat([o.txt for o in outs]).to(img.device, img.dtype)
            return res
        return run

    def _patch_generation(self, pe: torch.Tensor) -> dict:
        """The rotary embedding of a patched call, put in the object store once (keyed by content)."""
        key = "patch:" + _tensor_key(pe)
        if key not in self._gen_refs:
            self._gen_refs[key] = {"pe": [ray.put(pe.cpu())]}
            while len(self._gen_refs) > 4 * max(1, self.options.micro_batches):
                self._gen_refs.popitem(last=False)
        return {"id": key, "pe": self._gen_refs[key]["pe"], "txt": None}

    def set_loras(self, loras: list[tuple[str | os.PathLike, float]]) -> str | None:
        """Apply LoRA safetensors files ``[(path, strength), ...]`` (BFL/ComfyUI, kohya ``lora_unet_``
        or diffusers PEFT keys) to every block of this split, replacing earlier ones; ``[]`` removes
        them.  Returns the set's content hash (None when empty)."""
        from mesh_ray.lora import set_split_loras

        return set_split_loras(self, loras)

    # -- info and teardown ----------------------------------------------------------------------

    @property
    def stages(self) -> list[Segment]:
        return self.segments

    def stage_info(self, timeout_s: float = 30) -> list[dict]:
        out = []
        for seg in self.segments:
            if seg.spec.local:
                out.append({"kind": "local", "index": seg.index, "blocks": str(seg.range), "device": str(self.device)})
            else:
                out.append(self._get(seg.actor.info.remote(), seg, timeout_s, "reporting its info"))
        return out

    def close(self) -> None:
        """Kill the stage actors and free their resources (idempotent)."""
        self._closed = True
        for seg in self.segments:
            if seg.actor is not None:
                try:
                    ray.kill(seg.actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
                seg.actor = None
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None
        self._gen_refs.clear()

    def __enter__(self) -> "SplitModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _patch_cond(args: dict, dtype: torch.dtype) -> BlockCond:
    """The blocks' conditioning from patch args: ours pass ``cond``; ComfyUI's FLUX.1 passes ``vec``."""
    if args.get("cond") is not None:
        return args["cond"]
    vec = args["vec"]
    if not isinstance(vec, torch.Tensor):
        raise ConfigError("this forward passes the block modulation as a tuple (a FLUX.2-style model): remote "
                          "block patches support FLUX.1 models in ComfyUI; use mesh.split() for FLUX.2")
    return BlockCond(vec=vec.to(dtype))


def _slice_cond(cond: BlockCond, sl: slice) -> BlockCond:
    """One micro-batch of the conditioning (every tensor in it is batch-first)."""
    def cut(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x[sl] if x.shape[0] > 1 else x
        return tuple(cut(t) for t in x)

    return BlockCond(vec=cut(cond.vec), double_img=cut(cond.double_img), double_txt=cut(cond.double_txt),
                     single=cut(cond.single))


def _passthrough(args: dict, _extra: dict) -> dict:
    return {k: args[k] for k in ("img", "txt") if k in args}


def _cpu_cond(cond: BlockCond) -> BlockCond:
    return move_cond(cond, torch.device("cpu"))


def _grid(img_ids: torch.Tensor) -> tuple[int, int] | None:
    """(rows, cols) of the image-token grid from the position ids, when the tokens form one."""
    if img_ids.shape[1] == 0:
        return None
    rows = int(img_ids[0, :, 1].max()) + 1
    cols = int(img_ids[0, :, 2].max()) + 1
    return (rows, cols) if rows * cols == img_ids.shape[1] else None


def make_split(checkpoint: str, stages: int | list | None = None, n_blocks_remote: int | None = None,
               options: SplitOptions | dict | str | os.PathLike | None = None, load_local: bool = True,
               **option_kwargs: Any) -> SplitModel:
    """Resolve the stage list and build a SplitModel (``Mesh.split`` documents the arguments)."""
    info = inspect(checkpoint)
    if isinstance(options, (str, os.PathLike)):  # a YAML/JSON settings file
        opts = load_settings(SplitOptions, options, **option_kwargs)
    else:
        given = options.model_dump() if isinstance(options, SplitOptions) else dict(options or {})
        opts = load_settings(SplitOptions, None, **given, **option_kwargs)
    n = info.config.num_blocks
    if n_blocks_remote is not None and stages is not None:
        raise ConfigError("give either stages or n_blocks_remote, not both")
    if n_blocks_remote is not None:
        if not 1 <= n_blocks_remote <= n:
            raise ConfigError(f"n_blocks_remote={n_blocks_remote} but the model has {n} blocks: use 1 to {n}")
        specs = [StageSpec(blocks=f"0-{n - n_blocks_remote - 1}", local=True)] if n_blocks_remote < n else []
        specs.append(StageSpec(blocks=f"{n - n_blocks_remote}-{n - 1}"))
    elif stages is None or isinstance(stages, int):
        from mesh_ray.models.blocks import split_evenly

        specs = [StageSpec(blocks=f"{r.start}-{r.stop - 1}") for r in split_evenly(info.num_double, info.num_single, stages or 2)]
    else:
        specs = [validate(StageSpec, {"blocks": s} if isinstance(s, str) else s) for s in stages]
    return SplitModel(str(checkpoint), specs, opts, info, load_local=load_local)


__all__ = ["SplitModel", "make_split", "Flux"]
