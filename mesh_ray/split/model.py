"""A FLUX transformer split over stages: same call, same result as the single-process forward.

The caller keeps the embedders and the final layer (and any block range marked ``local``);
every other range runs on a stage actor.  Consecutive remote stages hand activations to each
other as ObjectRefs, so the caller is not on the data path.  Per-generation constants (rotary
``pe``, the text tokens when the first stage starts at block 0) are put in the object store once
and cached on the stages by generation id; per-step conditioning is sent raw.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from mesh_ray.actors.device import pick_device
from mesh_ray.actors.flux_host import FluxHost, flux_state, flux_streams, move_cond, with_cached_text
from mesh_ray.actors.front import FrontInput, check_front, front_input
from mesh_ray.actors.records import GenConsts, Hop
from mesh_ray.actors.stage import GENERATIONS_KEPT
from mesh_ray.config import SplitOptions, StageSpec, load_settings, validate
from mesh_ray.digest import DigestMemo, tensor_digest
from mesh_ray.errors import ConfigError, MeshError
from mesh_ray.models.blocks import BlockRange, check_cover, locate
from mesh_ray.models.checkpoint import CheckpointInfo, inspect, load_blocks
from mesh_ray.models.flux import BlockCond, BlockState, Flux, build
from mesh_ray.split.patch_args import across_boundary, patch_cond
from mesh_ray.split.stages import GenerationCache, Segment, StageGroup, put_consts


@dataclass
class _Generation:
    """Per-generation constants: the stages' record, and the same tensors on the caller's device."""

    consts: GenConsts
    pe: torch.Tensor
    txt: torch.Tensor | None = None


@dataclass
class _Flight:
    """One micro-batch moving through the segments."""

    state: Any  # BlockState, or an ObjectRef of a WireState
    cond: BlockCond
    gen: _Generation
    cond_host: BlockCond | None = None  # the same conditioning on the host, for stage calls
    cursor: int = 0
    transfers: list[Hop] = field(default_factory=list)


@dataclass
class Step:
    """One forward call in flight (``SplitModel.submit_step``): its micro-batches and start time."""

    flights: list[_Flight]
    t0: float

    def pending(self) -> list:
        """The ObjectRefs this step still waits for (one per micro-batch in a remote chain)."""
        return [f.state for f in self.flights if isinstance(f.state, ray.ObjectRef)]


@dataclass
class StepStats:
    """What the last forward moved: one ``Hop`` per transfer (link, mode, dtype, raw/wire bytes, ms)."""

    transfers: list[Hop] = field(default_factory=list)
    ms: float = 0.0

    @property
    def hops(self) -> int:
        return len(self.transfers)

    @property
    def bytes(self) -> int:
        """Bytes on the wire for all hops."""
        return sum(t.wire_bytes for t in self.transfers)

    @property
    def raw_bytes(self) -> int:
        """What the same hops would have carried uncoded."""
        return sum(t.raw_bytes for t in self.transfers)


def tensor_key(*tensors: torch.Tensor) -> str:
    """A content hash of tensors: the cache key of per-generation constants."""
    return tensor_digest(((str(i), t) for i, t in enumerate(tensors)), 12)


class SplitModel:
    """Callable like ``Flux.forward``; built by ``Mesh.split`` (see there for the arguments)."""

    def __init__(self, checkpoint: str, stages: list[StageSpec], options: SplitOptions, info: CheckpointInfo,
                 load_local: bool = True):
        self.checkpoint = checkpoint
        self.info = info
        self.config = info.config
        self.options = options
        self.id = uuid.uuid4().hex[:8]
        # The caller's front (embedders, final layer, local ranges) follows the caller's own device;
        # each stage decides its own dtype from its device (actors/device.py).
        self.device, self.dtype = pick_device(options.dtype, driver=True)
        ranges = [info.range(s.blocks, f"stage {i} block range") for i, s in enumerate(stages)]
        check_cover(ranges)
        self.segments = [Segment(r, s, index=i) for i, (r, s) in enumerate(zip(ranges, stages))]
        for seg in self.segments:
            if seg.spec.local:
                seg.dtype = self.dtype
        self.last = StepStats()  # for reports only: concurrent steps get theirs from finish_step
        self.plan = None  # the planner's Plan when mesh.split(plan=...) chose the stages
        self._gens = GenerationCache(max(GENERATIONS_KEPT, 4 * options.micro_batches))
        # front="stage": the first stage embeds, the last runs the final layer, the caller holds no weights
        self.front_on_stage = check_front(options.front, [s.index for s in self.segments if s.spec.local])
        self.group = StageGroup(self.id, self.segments, options, self._host_for, self._shard_for, checkpoint,
                                self.device, self.dtype)
        # The caller's part: embedders, final layer, and blocks of local segments only (none when
        # the caller has its own model and uses only block_patches(), as inside ComfyUI).
        self.model = build(self.config, "meta", self.dtype)
        if load_local and not self.front_on_stage:
            local = [s.range for s in self.segments if s.spec.local]
            sd = load_blocks(checkpoint, local, non_block=True, dtype=self.dtype, info=info)
            self.model.load_state_dict(sd, strict=False, assign=True)
            self._to_device(local)
        self.group.start()

    # -- setup ----------------------------------------------------------------------------------

    def _to_device(self, local: list[BlockRange]) -> None:
        for name, mod in self.model.named_children():
            if name not in ("double_blocks", "single_blocks"):
                mod.to(self.device)
        for r in local:
            for b in r:
                self.model.block(b).to(self.device)

    def holds_front(self, seg: Segment) -> tuple[bool, bool]:
        """(embeds, finishes): whether ``seg`` runs the embedders / the final layer.  Only with
        front='stage', where every segment is remote: the first one embeds, the last one finishes."""
        if not self.front_on_stage:
            return False, False
        return seg is self.segments[0], seg is self.segments[-1]

    def _host_for(self, seg: Segment) -> FluxHost:
        embed, final = self.holds_front(seg)
        return FluxHost(seg.index, self.config, seg.range.start, seg.range.stop, embed=embed, final=final)

    def _shard_for(self, seg: Segment) -> dict[str, torch.Tensor]:
        return load_blocks(self.checkpoint, [seg.range], non_block=any(self.holds_front(seg)), info=self.info)

    @property
    def recovery(self):
        """Stage restarts and step retries of this split (``split/recovery.py``)."""
        return self.group.recovery

    def stage_get(self, ref: Any, seg: Segment | None, timeout: float, doing: str) -> Any:
        return self.group.stage_get(ref, seg, timeout, doing)

    # -- forward --------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward(*args, **kwargs)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        """Same signature and result as ``Flux.forward``; a batch is cut into ``micro_batches``."""
        out, self.last = self.finish_step(self.submit_step(img, img_ids, txt, txt_ids, timesteps, y, guidance,
                                                           transformer_options))
        return out

    def submit_step(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                    timesteps: torch.Tensor, y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                    transformer_options: dict | None = None) -> Step:
        """Start one forward: embed each micro-batch and submit it as far as it goes without waiting.

        Holds no per-call state on ``self``, so several steps (of different images) may be in flight;
        ``finish_step`` completes one.
        """
        if self.closed:
            raise MeshError("this split was closed: create a new one with mesh.split(...)")
        t0 = time.perf_counter()
        gen_id = (transformer_options or {}).get("mesh_generation")
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
                cond = None if self.front_on_stage else self.model.conditioning(args[4], args[5], args[6], dtype=self.dtype)
                key = f"{gen_id}:{i}/{n}:{bounds[i]}-{bounds[i + 1]}" if gen_id else tensor_key(args[1], args[2], args[3])
                gen, state = self._generation(key, args)
                flights.append(_Flight(state=state, cond=cond, gen=gen, cond_host=None if cond is None else _cpu_cond(cond)))
            for f in flights:
                self._advance(f)
        return Step(flights, t0)

    def finish_step(self, step: Step) -> tuple[torch.Tensor, StepStats]:
        """Wait for a submitted step (every wait bounded by step_timeout_s); its output and transfers."""
        with torch.inference_mode():
            self._run(step.flights)
            out = torch.cat([f.state.img if self.front_on_stage else self.model.finish(f.state, f.cond)
                             for f in step.flights], dim=0)
        stats = StepStats([t for f in step.flights for t in f.transfers], (time.perf_counter() - step.t0) * 1000)
        return out, stats

    def _generation(self, key: str, args: list) -> tuple[_Generation, BlockState | FrontInput]:
        """Embed one micro-batch; put pe (and unchanged text tokens) in the object store once per generation.
        With the front on the stages the text goes before its embedder and the first stage embeds."""
        img, img_ids, txt, txt_ids = args[:4]
        first = self.segments[0]
        cache_txt = not first.spec.local and first.range.start == 0

        def make() -> _Generation:
            pe = self.model.embed_positions(img_ids, txt_ids)
            txt_emb = txt if self.front_on_stage else self.model.embed_text(txt)
            consts = put_consts(key, {"pe": pe, **({"txt": txt_emb} if cache_txt else {})}, _grid(img_ids))
            return _Generation(consts, pe, txt_emb)

        g = self._gens.remember(key, make)
        if self.front_on_stage:
            return g, front_input(img, *args[4:7], first.in_plan)
        state = BlockState(self.model.img_in(img), g.txt[:, :0] if cache_txt else g.txt, txt.shape[1])
        return g, state

    def submit_chain(self, chain: list[Segment], state: BlockState | Any, cond: BlockCond | None, gen: GenConsts,
                     remember: bool = True) -> Any:
        """Submit one micro-batch through consecutive remote segments without waiting (the group's one
        submit path, ``StageGroup.submit_chain``); ``state`` a FLUX block state or a ``FrontInput``."""
        if isinstance(state, BlockState):
            state = flux_streams(state, gen.grid)
        return self.group.submit_chain(chain, state, cond, gen, remember)

    def collect(self, ref: Any, seg: Segment, device: torch.device | None = None, dtype: torch.dtype | None = None,
                doing: str = "a forward step") -> tuple[BlockState, list[Hop]]:
        """Wait for a chain from ``submit_chain`` ending at ``seg`` (restarts and retries included); the
        FLUX block state on ``device`` in ``dtype`` (default: the caller's) and the hops it made."""
        streams, hops = self.group.collect(ref, seg, device or self.device, dtype or self.dtype, doing)
        return flux_state(streams), hops

    def _run(self, flights: list[_Flight]) -> None:
        """Advance every micro-batch: local segments here, remote chains submitted without waiting."""
        pending = list(range(len(flights)))
        while pending:
            for i in pending:
                self._advance(flights[i])
            for i in pending:
                f = flights[i]
                if isinstance(f.state, ray.ObjectRef):
                    f.state, hops = self.collect(f.state, self.segments[f.cursor - 1])
                    f.transfers.extend(hops)
            pending = [i for i in pending if flights[i].cursor < len(self.segments)]

    def _advance(self, f: _Flight) -> None:
        """Run local segments here and submit the next remote chain; stop at the first result to wait for."""
        segs = self.segments
        while f.cursor < len(segs) and not isinstance(f.state, ray.ObjectRef):
            seg = segs[f.cursor]
            if seg.spec.local:
                state = with_cached_text(f.state, f.gen.txt)
                f.state = self.model.run_blocks(state, f.cond, f.gen.pe, seg.range.start, seg.range.stop)
                f.cursor += 1
                continue
            end = f.cursor
            while end + 1 < len(segs) and not segs[end + 1].spec.local:
                end += 1
            f.state = self.submit_chain(segs[f.cursor : end + 1], f.state, f.cond_host, f.gen.consts)
            f.cursor = end + 1

    # -- block replacement for a foreign forward (e.g. ComfyUI's own FLUX model) ----------------

    def block_patches(self) -> dict:
        """``patches_replace["dit"]`` entries that run this split's remote ranges in any forward
        that supports ComfyUI-style block replacement (ours included)."""
        check_front(self.options.front, [], patches=True)
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
            at = {first: self._chain_patch(chain, first)}
            if first < depth < stop:  # FLUX.2 tuple form: runs at the first single block (patch_args.py)
                at[first], at[depth] = across_boundary(at[first], self.config.arch)
            for b in range(first, stop):
                kind, k = locate(b, depth)
                patches[(f"{kind}_block", k)] = at.get(b, _passthrough)
            i = j + 1
        return patches

    def _chain_patch(self, chain: list[Segment], first: int):
        """One patch that runs a chain of remote stages.  ``args`` as ComfyUI's FLUX.1 forward passes
        them (img, txt, vec, pe, attn_mask, transformer_options) or as ours does (plus ``cond``)."""
        pe_key = DigestMemo(tensor_key)  # ComfyUI recomputes pe each step: compare, do not re-hash

        def run(args: dict, _extra: dict) -> dict:
            if self.closed:
                raise MeshError("this split was closed: create a new one with mesh.split(...)")
            if args.get("attn_mask") is not None:
                raise ConfigError("an attention mask reached a remote block range: remote stages run unmasked "
                                  "attention; drop the masking node or keep these blocks local")
            img, pe = args["img"], args["pe"]
            cond = _cpu_cond(patch_cond(args, self.dtype, self.config.arch))  # either form (patch_args.py)
            b = img.shape[0]
            n = min(self.options.micro_batches, b)  # e.g. CFG's two halves pipelined over the stages
            bounds = [round(i * b / n) for i in range(n + 1)]
            refs = []
            # CUDA IPC into the chain shares the caller's tensors where they are; else they go from the host
            dev = img.device if chain[0].in_plan.transport == "cuda_ipc" else torch.device("cpu")
            for i in range(n):
                sl = slice(bounds[i], bounds[i + 1])
                pe_i = pe if pe.shape[0] == 1 else pe[sl]
                key = "patch:" + pe_key(pe_i)
                gen = self._gens.remember(key, lambda: _Generation(put_consts(key, {"pe": pe_i}), pe_i)).consts
                if first < self.config.depth:
                    txt = args["txt"][sl]
                    state = BlockState(img[sl].to(dev, self.dtype), txt.to(dev, self.dtype), txt.shape[1])
                else:  # joined stream; the text length only matters to a caller that unjoins
                    state = BlockState(img[sl].to(dev, self.dtype), None, 0)
                # submitted without waiting: micro-batch i+1 enters the chain as i moves on
                refs.append(self.submit_chain(chain, state, cond if n == 1 else _slice_cond(cond, sl), gen))
            outs, hops = [], []
            for ref in refs:
                out, h = self.collect(ref, chain[-1], img.device, img.dtype, "a patched block range")
                outs.append(out.unjoin() if first < self.config.depth else out.join())
                hops.extend(h)
            self.last = StepStats(hops)
            def cat(ts: list) -> torch.Tensor:  # one micro-batch: no copy
                return ts[0] if len(ts) == 1 else torch.cat(ts)

            res = {"img": cat([o.img for o in outs])}
            if first < self.config.depth:
                res["txt"] = cat([o.txt for o in outs])
            return res
        return run

    def set_loras(self, loras: list[tuple[str | os.PathLike, float]]) -> str | None:
        """Apply LoRA safetensors files ``[(path, strength), ...]`` (BFL/ComfyUI, kohya ``lora_unet_``
        or diffusers PEFT keys) to every block of this split, replacing earlier ones; ``[]`` removes
        them.  Returns the set's content hash (None when empty)."""
        from mesh_ray.split.lora import set_split_loras

        return set_split_loras(self, loras)

    # -- info and teardown ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran: its stages are gone."""
        return self.group.closed

    @property
    def stages(self) -> list[Segment]:
        return self.segments

    @property
    def links(self) -> list[dict]:
        """Each link's codec mode, wire dtype, transport and why it was chosen (docs/transport.md)."""
        return self.group.links()

    @property
    def generations_cached(self) -> int:
        """Per-generation constants held in the object store now (at most ``generations_kept``)."""
        return len(self._gens)

    @property
    def generations_kept(self) -> int:
        """The bound of that cache: as many as a stage keeps, and at least 4 per micro-batch."""
        return self._gens.kept

    def stage_info(self, timeout_s: float = 30) -> list[dict]:
        remote = iter(self.group.info(timeout_s))
        return [{"kind": "local", "index": seg.index, "blocks": str(seg.range), "device": str(self.device)}
                if seg.spec.local else next(remote) for seg in self.segments]

    def close(self) -> None:
        """Kill the stage actors and free their resources (idempotent)."""
        self.group.close()
        self._gens.clear()

    def __enter__(self) -> "SplitModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _slice_cond(cond: BlockCond, sl: slice) -> BlockCond:
    """One micro-batch of the conditioning (every tensor in it is batch-first)."""
    def cut(x: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x[sl] if x.shape[0] > 1 else x
        cuts = [cut(t) for t in x]
        return type(x)(*cuts) if hasattr(x, "_fields") else tuple(cuts)  # a Mod record stays one

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
    opts = load_settings(SplitOptions, options, **option_kwargs)  # keywords > MESH_RAY_* > options
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
