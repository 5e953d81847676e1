"""The GPU checks of docs/gpu-results.md in one run, for a lent GPU machine without Ray.

``python -m mesh_ray.bench.gpu_checks --out DIR [--fixtures DIR] [--budget-s S]`` runs, in order of
value, each in its own try block (one failing check does not stop the others) and within a
time budget:

  transport (needs Ray) ``bench split`` at full width (3072, bf16, 1024x1024 tokens, ``--double``
          / ``--single`` blocks) with each of ``--transports``, two stages on one GPU
          (``num_gpus=0.5``): ratio split / local, max abs difference, each hop's transport and ms;
          then a stage killed mid-generation over CUDA IPC: the image equals the fault-free one.
  comfy   (with ``--comfy DIR``) ``comfy_integration.gpu_check``: the ComfyUI split step ratio.

  split   FLUX.1-dev size, bf16, 1024x1024 (4096 + 512 tokens): ms per step of the whole model,
          ms per double / single block and of the caller's front (embedders + final layer), and
          two halves with the activations going GPU -> host -> GPU between them as the object
          store would move them; the ratio split / local.
  codec   the doctor rows; NVDEC (PyNvVideoCodec) decode of an x265-made payload compared with
          PyAV's decode made where PyAV runs (``--fixtures``, from ``make_fixtures``); quant8 with
          nvCOMP and zstd on a 28 MB bf16 activation: encode / decode GB/s.
  vae     a 1024x1024 FLUX.1 latent through a random-weight decoder of the real size, full and
          tiled: ms and peak VRAM.
  offload ``bench offload`` at FLUX.1-dev size, windows 1, 2, 4, a memory budget and the
          diffusers group-offload peer.

Everything lands in DIR/gpu_checks.json; a summary is printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

HEVC_FIXTURE = "hevc_x265.safetensors"


def _cuda_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream, timed with events (CPU: wall clock)."""
    if not torch.cuda.is_available():
        return _wall_ms(fn, repeats, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _wall_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# split: the real `bench split` figure
# --------------------------------------------------------------------------------------------


def check_split(preset: str = "flux1-dev", device: str = "cuda", side: int = 64, txt_len: int = 512) -> dict:
    from mesh_ray.models.flux import PRESETS, BlockState, build, position_ids

    cfg = PRESETS[preset]
    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build(cfg, dev, dt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith(".scale") else p.normal_(0.0, 0.02)
    model.eval()
    img_ids, txt_ids = position_ids(cfg.arch, 1, side, side, txt_len, dev)
    x = dict(img=torch.randn(1, side * side, cfg.in_channels, device=dev, dtype=dt), img_ids=img_ids,
             txt=torch.randn(1, txt_len, cfg.context_in_dim, device=dev, dtype=dt), txt_ids=txt_ids,
             timesteps=torch.tensor([0.5], device=dev), y=torch.randn(1, cfg.vec_in_dim, device=dev, dtype=dt),
             guidance=torch.tensor([3.5], device=dev))
    n, depth = cfg.num_blocks, cfg.depth
    half = n // 2
    out: dict[str, Any] = {"model": f"{preset} (random {str(dt).removeprefix('torch.')})", "tokens": f"{side * side} + {txt_len}", "blocks": n,
                           "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    with torch.inference_mode():
        ref = model(**x)
        out["step_ms_local"] = _cuda_ms(lambda: model(**x), 5)
        state, cond, pe = model.embed(**x)
        out["double_block_ms"] = _cuda_ms(lambda: model.run_blocks(state, cond, pe, 0, 1), 10)
        joined = state.join()
        out["single_block_ms"] = _cuda_ms(lambda: model.run_blocks(joined, cond, pe, depth, depth + 1), 10)

        def front() -> None:  # what the caller runs per step: embedders and the final layer
            model.embed(**x)
            model.finish(joined, cond)

        out["front_ms"] = _cuda_ms(front, 10)
        out["double_block_bytes"] = sum(p.numel() * p.element_size() for p in model.double_blocks[0].parameters())
        out["single_block_bytes"] = sum(p.numel() * p.element_size() for p in model.single_blocks[0].parameters())

        def hop(s: BlockState) -> BlockState:
            # The object store's path for a CUDA tensor: device -> host, a copy into shared memory, host -> device.
            img = s.img.cpu().clone().to(dev)
            txt = s.txt.cpu().clone().to(dev) if s.txt is not None else None
            return BlockState(img, txt, s.txt_len)

        def split_step() -> torch.Tensor:
            s, c, p = model.embed(**x)
            s = hop(model.run_blocks(s, c, p, 0, half))
            s = model.run_blocks(s, c, p, half, n)
            return model.finish(hop(s), c)  # the reply goes back to the caller too

        got = split_step()
        out["max_abs_diff_split_vs_local"] = float((got.float() - ref.float()).abs().max())
        out["step_ms_split"] = _wall_ms(split_step, 5)
        out["step_ms_local_wall"] = _wall_ms(lambda: model(**x), 5)
        mid = model.run_blocks(state, cond, pe, 0, half)
        out["hop_bytes"] = sum(t.numel() * t.element_size() for t in mid.tensors())
        out["hop_ms"] = _wall_ms(lambda: hop(mid), 10)
        out["ratio_split_over_local"] = out["step_ms_split"] / out["step_ms_local_wall"]
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# transport: Ray on the GPU machine
# --------------------------------------------------------------------------------------------


def check_transport(out_dir: Path, transports: str = "object,cuda_ipc,auto", double: int = 4, single: int = 8,
                    repeats: int = 5, hidden: int = 3072, heads: int = 24, image_tokens: int = 4096,
                    txt_tokens: int = 512, steps: int = 4, size: int = 1024) -> dict:
    """``bench split`` per transport with two stages on one GPU, then a kill over CUDA IPC (see the docstring).
    On a machine without CUDA it runs the same path on the CPU (a dry run)."""
    import ray

    from mesh_ray.bench import gpu_fault_check
    from mesh_ray.bench.split import parse_transports, run_split_bench

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {}
    try:
        out["bench_split"] = run_split_bench(hidden=hidden, heads=heads, depth=double, single=single,
                                             image_tokens=image_tokens, txt_tokens=txt_tokens, stages=2, repeats=repeats,
                                             transports=parse_transports(transports), num_gpus=0.5 if cuda else None)
    finally:
        ray.shutdown()
    rows = out["bench_split"]["by_transport"]
    out["summary"] = {t: {"ratio_split_over_local": r["ratio_split_over_local"], "max_abs_diff": r["max_abs_diff"],
                          "stage_hop_ms": r["hop_ms"], "hops": [f"{h['link']}:{h['transport']}" for h in r["hops"]]}
                      for t, r in rows.items()}
    out["fault"] = gpu_fault_check.run(out_dir, double, single, steps, size if cuda else 64,
                                       "cuda_ipc" if cuda else "gloo")
    return out


def check_comfy(comfy: Path | None, out_dir: Path, timeout_s: float = 400) -> dict:
    """The ComfyUI split on the GPU (``comfy_integration.gpu_check``), in its own process."""
    import subprocess

    if comfy is None:
        return {"skipped": "no --comfy DIR (a ComfyUI tree carried to the machine)"}
    res = subprocess.run([sys.executable, "-m", "comfy_integration.gpu_check", "--comfy", str(comfy), "--out",
                          str(out_dir / "comfy")], capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    return {"returncode": res.returncode, "result": json.loads(lines[-1]) if lines else None,
            "stderr_tail": res.stderr[-3000:]}


# --------------------------------------------------------------------------------------------
# codec
# --------------------------------------------------------------------------------------------


def make_fixtures(folder: str | Path) -> Path:
    """Where PyAV runs: an x265-coded payload of an activation-like tensor and PyAV's decode of it."""
    from safetensors.torch import save_file

    from mesh_ray.codec import decode, encode
    from mesh_ray.codec.header import unpack
    from mesh_ray.codec.x265 import decode_frames

    g = torch.Generator().manual_seed(0)
    grid, txt, ch = (32, 32), 64, 768
    base = torch.randn(1, ch, 8, 8, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=grid, mode="bilinear", align_corners=False)
    img = (smooth.flatten(2).transpose(1, 2) + 0.1 * torch.randn(1, grid[0] * grid[1], ch, generator=g))
    x = torch.cat((torch.randn(1, txt, ch, generator=g), img), dim=1).to(torch.bfloat16)
    payload = encode(x, {"mode": "hevc", "backend": "x265", "qp": 18}, grid=grid, txt_len=txt)
    head, sections = unpack(payload)
    from mesh_ray.codec import hevc

    count = hevc.frame_count(ch, head.tile_dim)
    stream = bytes(sections[5])  # prefix group (4) then [scales, stream, ...] of the image group
    frames = decode_frames(stream, count)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
               "stream": torch.frombuffer(bytearray(stream), dtype=torch.uint8),
               "frames_pyav": frames.contiguous(), "decoded_pyav": decode(payload, "cpu").contiguous(),
               "count": torch.tensor([count])}, str(out / HEVC_FIXTURE))
    return out / HEVC_FIXTURE


def check_codec(fixtures: Path | None, device: str = "cuda", tokens: int = 4608, channels: int = 3072) -> dict:
    from mesh_ray.codec import decode, encode, probe_backends
    from mesh_ray.codec import nvenc

    out: dict[str, Any] = {"doctor": [{"backend": r.name, "usable": r.usable, "reason": r.reason}
                                      for r in probe_backends()]}
    try:
        import PyNvVideoCodec as nvc  # noqa: N813

        out["pynvvideocodec"] = {"version": getattr(nvc, "__version__", "?"),
                                 "names": sorted(n for n in dir(nvc) if not n.startswith("_"))}
    except Exception as e:  # noqa: BLE001
        out["pynvvideocodec"] = f"import failed: {type(e).__name__}: {e}"
    if fixtures is not None and (fixtures / HEVC_FIXTURE).is_file():
        from safetensors.torch import load_file

        fx = load_file(str(fixtures / HEVC_FIXTURE))
        stream = bytes(fx["stream"].numpy().tobytes())
        count = int(fx["count"][0])
        res: dict[str, Any] = {"frames": count, "frame_shape": list(fx["frames_pyav"].shape[1:])}
        try:
            frames = nvenc.decode_frames(stream, count, tuple(fx["frames_pyav"].shape[-2:]), torch.device(device))
            res["frames_equal_pyav"] = bool(torch.equal(frames.cpu(), fx["frames_pyav"]))
            res["frames_max_abs_diff"] = int((frames.cpu().int() - fx["frames_pyav"].int()).abs().max())
            payload = bytes(fx["payload"].numpy().tobytes())
            t = decode(payload, device, hevc_decoder="nvdec")
            res["tensor_equal_pyav"] = bool(torch.equal(t.cpu(), fx["decoded_pyav"]))
            res["nvdec_decode_ms"] = _wall_ms(lambda: decode(payload, device, hevc_decoder="nvdec"), 5)
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()[-3000:]
            res["probe"] = _probe_nvdec(stream)
        out["nvdec_vs_pyav"] = res
    else:
        out["nvdec_vs_pyav"] = "skipped: no fixture (make_fixtures where PyAV runs)"
    # quant8 + entropy on a 28 MB bf16 activation (4608 tokens x 3072 channels)
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(1, tokens, channels, device=device, generator=g) * 0.5).to(torch.bfloat16)
    grid = (int((tokens - 512) ** 0.5),) * 2
    raw = x.numel() * x.element_size()
    rows = []
    for spec in ({"mode": "quant8", "entropy": "nvcomp"}, {"mode": "quant8", "entropy": "zstd"},
                 {"mode": "quant8", "entropy": "none"}, {"mode": "quant8", "lossless": True, "entropy": "nvcomp"},
                 {"mode": "quant8", "lossless": True, "entropy": "zstd"}):
        row: dict[str, Any] = {"spec": spec}
        try:
            payload = encode(x, spec, grid=grid, txt_len=512)
            enc_ms = _wall_ms(lambda: encode(x, spec, grid=grid, txt_len=512), 3)
            y = decode(payload, device)
            dec_ms = _wall_ms(lambda: decode(payload, device), 3)
            row.update(raw_bytes=raw, wire_bytes=len(payload), ratio=raw / len(payload), encode_ms=enc_ms,
                       decode_ms=dec_ms, encode_gb_s=raw / enc_ms / 1e6, decode_gb_s=raw / dec_ms / 1e6,
                       max_abs=float((y.float() - x.float()).abs().max()),
                       exact=bool(torch.equal(y, x)))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-2000:]
        rows.append(row)
    out["quant8_28MB"] = rows
    return out


def _probe_nvdec(stream: bytes) -> dict:
    """What PyNvVideoCodec's decoder objects look like here, to fix our calls offline."""
    import os
    import tempfile

    info: dict[str, Any] = {}
    try:
        import PyNvVideoCodec as nvc  # noqa: N813

        with tempfile.NamedTemporaryFile(suffix=".hevc", delete=False) as fh:
            fh.write(stream)
        for name in ("CreateDemuxer", "CreateDecoder", "SimpleDecoder", "PyDecoder", "PyNvDemuxer"):
            obj = getattr(nvc, name, None)
            info[name] = (obj.__doc__ or "")[:1500] if obj is not None else None
        try:
            demux = nvc.CreateDemuxer(filename=fh.name)
            info["demux_codec"] = str(demux.GetNvCodecId())
            dec = nvc.CreateDecoder(gpuid=0, codec=demux.GetNvCodecId(), usedevicememory=True)
            got = []
            for packet in demux:
                for frame in dec.Decode(packet):
                    got.append({"shape": list(getattr(frame, "shape", [])), "format": str(getattr(frame, "format", "")),
                                "dir": [n for n in dir(frame) if not n.startswith("_")][:40]})
            info["frames"] = got[:3]
            info["frame_count"] = len(got)
        except Exception as e:  # noqa: BLE001
            info["demux_decode_error"] = f"{type(e).__name__}: {e}"
        os.unlink(fh.name)
    except Exception as e:  # noqa: BLE001
        info["error"] = f"{type(e).__name__}: {e}"
    return info


# --------------------------------------------------------------------------------------------
# vae
# --------------------------------------------------------------------------------------------


def check_vae(preset: str = "flux1", device: str = "cuda", side: int = 128) -> dict:
    from mesh_ray.models.vae import build_vae, vae_preset

    cfg = vae_preset(preset)
    cuda = device == "cuda"
    model = build_vae(cfg, device, torch.bfloat16 if cuda else torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("weight") and p.ndim == 1 else p.normal_(0.0, 0.02)
    latent = torch.randn(1, cfg.latent_channels, side, side, device=device)
    out: dict[str, Any] = {"latent": [1, cfg.latent_channels, side, side], "image": f"{8 * side}x{8 * side}",
                           "dtype": str(model.dtype)}
    weights = torch.cuda.memory_allocated() if cuda else 0
    for label, tile in (("full", None), ("tiled 512", 512), ("tiled 256", 256)):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        img = model.decode(latent, tile=tile)
        ms = _cuda_ms(lambda: model.decode(latent, tile=tile), 3, warmup=1)
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        out[label] = {"ms": ms, "peak_vram_bytes": peak, "peak_over_weights_bytes": peak - weights}
        if tile is None:
            full = img
        else:
            out[label]["max_abs_diff_vs_full"] = float((img - full).abs().max())
    out["weight_bytes"] = weights
    return out


# --------------------------------------------------------------------------------------------
# offload
# --------------------------------------------------------------------------------------------


def check_offload(quick: bool) -> dict:
    from mesh_ray.bench.offload import run_offload_bench

    return run_offload_bench(device="cuda", windows=(1, 2, 4), steps=3, peer=True, quick=quick)


def environment() -> dict:
    import platform
    import subprocess

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
            "nvidia_smi": smi.stdout.strip(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/gpu")
    ap.add_argument("--fixtures", default=None)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--only", default="transport,split,codec,comfy,vae,offload")
    ap.add_argument("--transports", default="object,cuda_ipc,auto", help="for the transport check")
    ap.add_argument("--double", type=int, default=4, help="double blocks of the transport check's model")
    ap.add_argument("--single", type=int, default=8, help="single blocks of the transport check's model")
    ap.add_argument("--comfy", default=None, help="a ComfyUI tree for the comfy check")
    ap.add_argument("--make-fixtures", action="store_true", help="write the PyAV fixtures to --fixtures and exit")
    args = ap.parse_args(argv)
    if args.make_fixtures:
        print(make_fixtures(args.fixtures))
        return
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"environment": environment()}
    checks = {"transport": lambda: check_transport(out_dir, args.transports, args.double, args.single),
              "split": check_split, "codec": lambda: check_codec(Path(args.fixtures) if args.fixtures else None),
              "comfy": lambda: check_comfy(Path(args.comfy) if args.comfy else None, out_dir),
              "vae": check_vae, "offload": lambda: check_offload(quick=False)}
    for name in args.only.split(","):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 30:
            result[name] = f"skipped: {left:.0f}s of the budget left"
            continue
        c0 = time.perf_counter()
        try:
            result[name] = checks[name]()
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - c0, 1)
        (out_dir / "gpu_checks.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"== {name} ({result['seconds'][name]} s)", flush=True)
        print(json.dumps(result[name], default=str)[:6000], flush=True)
    print(json.dumps({k: v for k, v in result.items() if k in ("environment", "seconds")}, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
