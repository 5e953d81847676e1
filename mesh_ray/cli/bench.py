"""``mesh-ray bench ...``: every benchmark, each a ratio measured side by side in one run."""

from __future__ import annotations

from typing import Optional

import typer

from mesh_ray.bench import goals
from mesh_ray.cli.app import Arch, bench_app
from mesh_ray.cli.output import emit, emit_report, guard, int_list


@bench_app.command("split", help="Split vs local forward at the FLUX 1024x1024 token count (raw mode), side by side "
                                   f"per transport; goal ratio <= {goals.SPLIT['ratio_split_over_local']}.")
def bench_split(arch: Arch = typer.Option(Arch.flux1), hidden: int = typer.Option(512, min=64),
                heads: int = typer.Option(4, min=1), depth: int = typer.Option(1, min=0),
                single: int = typer.Option(3, min=0), image_tokens: int = typer.Option(4096, min=1),
                txt_tokens: int = typer.Option(512, min=1), stages: int = typer.Option(2, min=1),
                repeats: int = typer.Option(3, min=1),
                transport: str = typer.Option("auto", help="Comma-separated transports to measure side by side: "
                                                           "object, gloo, nccl, cuda_ipc, auto."),
                num_gpus: Optional[float] = typer.Option(None, min=0, help="GPUs per stage (0.5: two stages on one GPU)."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    from mesh_ray.bench.split import format_table, parse_transports, run_split_bench

    result = guard(lambda: run_split_bench(arch.value, hidden, heads, depth, single, image_tokens, txt_tokens, stages,
                                           repeats, parse_transports(transport), num_gpus))
    emit_report(result, as_json, format_table)


@bench_app.command("pipeline")
def bench_pipeline(quick: bool = typer.Option(False, "--quick", help="256px, 64 text tokens: a smoke run."),
                   stages: int = typer.Option(2, min=1), in_flight: str = typer.Option("1,2,4,8", help="M values."),
                   steps: Optional[int] = typer.Option(None, min=1, help="Sampler steps per image (default 4; 2 with --quick)."),
                   size: Optional[int] = typer.Option(None, min=16, help="Image size in px (default 768)."),
                   txt_tokens: Optional[int] = typer.Option(None, min=1, help="Text tokens (default 256)."),
                   threads: int = typer.Option(1, min=1, help="torch threads per stage and for the single process."),
                   images: Optional[int] = typer.Option(None, min=1, help="Images per measurement (default 2M up to "
                                                                          "M=4, then M+4; 2 for the single process)."),
                   hand_plans: bool = typer.Option(True, help="Measure every hand plan of two stages (else the even split only)."),
                   rounds: Optional[int] = typer.Option(None, min=1, help="Interleaved rounds of planner vs hand plans (default 1)."),
                   stage_threads: Optional[str] = typer.Option(None, help="Threads per stage for the planner section, e.g. 2,1."),
                   slow_stage: bool = typer.Option(True, help="Also: one stage 2x slower (half the threads), planner vs even split, "
                                                      "on a 12-block model at up to 512px."),
                   progress: bool = typer.Option(True, help="A progress bar and one line per measurement on stderr."),
                   as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """One process vs K stages with M images in flight: throughput ratio, bubble fraction, planner predicted vs measured,
    planner vs hand plans, and with one stage 2x slower planner vs even split (a few minutes by default)."""
    from mesh_ray.bench.pipeline import format_table, run_pipeline_bench

    def body() -> dict:
        ms = int_list(in_flight, "--in-flight", "1,2,4,8")
        per = int_list(stage_threads or None, "--stage-threads", "2,1")
        return run_pipeline_bench(quick, stages, ms, steps, size, txt_tokens, threads, images, hand_plans, rounds, per,
                                  slow_stage, progress)

    result = guard(body)
    emit_report(result, as_json, format_table)


@bench_app.command("codec")
def bench_codec(quick: bool = typer.Option(False, "--quick", help="Small tensors: seconds instead of a minute."),
                device: Optional[str] = typer.Option(None, help="cpu or cuda: instead, encode/decode GB/s per spec on "
                                                                "that device next to the CPU path (goal on a GPU: quant8 "
                                                                f">= {goals.CODEC_DEVICE['quant8_gb_s']:g} GB/s, NVDEC <= "
                                                                f"{goals.CODEC_DEVICE['nvdec_ms_per_512_frame']:g} ms per 512x512 frame)."),
                repeats: int = typer.Option(5, min=1, help="Timed runs per spec with --device (the median is kept)."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Every codec mode/QP on the standard activation set (captured tiny-FLUX + synthetic), vs bf16 raw;
    with --device, the codec's throughput on that device instead."""
    if device is not None:
        from mesh_ray.bench.codec_speed import format_table as speed_table, run_codec_speed_bench

        result = guard(lambda: run_codec_speed_bench(device, quick=quick, repeats=repeats))
        emit_report(result, as_json, speed_table)
        return
    from mesh_ray.bench.codec import format_table, run_codec_bench

    result = guard(lambda: run_codec_bench(quick=quick))
    emit_report(result, as_json, format_table)


@bench_app.command("offload")
def bench_offload(hidden: Optional[int] = typer.Option(None, min=64), tokens: Optional[int] = typer.Option(None, min=1),
                  blocks: Optional[int] = typer.Option(None, min=1), windows: str = typer.Option("1,2,4,8"),
                  budget_fraction: float = typer.Option(0.25), quick: bool = typer.Option(False, "--quick"),
                  steps: Optional[int] = typer.Option(None, min=1), device: Optional[str] = typer.Option(None),
                  dtype: Optional[str] = typer.Option(None),
                  as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Resident vs streamed weights (windows and a memory budget) side by side; diffusers peer on a GPU."""
    from mesh_ray.bench.offload import format_table, run_offload_bench

    def body() -> dict:
        return run_offload_bench(hidden, tokens, blocks, int_list(windows, "--windows", "1,2,4,8"), budget_fraction, quick, steps=steps, device=device, dtype=dtype)

    result = guard(body)
    emit_report(result, as_json, format_table)


@bench_app.command("vae", help="Wait vs Promise decoding over several generations, side by side; goal ratio >= "
                                 f"{goals.VAE['throughput_ratio_promise_over_wait']}, "
                                 f"< {goals.VAE['blocked_ms_per_image_promise']:g} ms blocked.")
def bench_vae(generations: int = typer.Option(6, min=2), size: int = typer.Option(512, min=16),
              rounds: int = typer.Option(2, min=1), threads: int = typer.Option(1, min=1),
              as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    from mesh_ray.bench.vae import format_table, run_vae_bench

    result = guard(lambda: run_vae_bench(generations=generations, size=size, rounds=rounds, threads=threads))
    emit_report(result, as_json, format_table)


@bench_app.command("comfy")
def bench_comfy(comfyui_path: Optional[str] = typer.Option(None, help="ComfyUI source tree (default: $COMFYUI_PATH)."),
                arch: str = typer.Option("flux1", help="flux1, flux2, ltxav, wan or qwen."),
                hidden: int = typer.Option(512, min=128, help="Model width (head size 128, as released)."),
                blocks: int = typer.Option(6, min=2, help="Blocks in the model; half run on the stage."),
                size: int = typer.Option(64, min=8, help="Latent side (image tokens: (size/2)^2)."),
                steps: int = typer.Option(3, min=1), repeats: int = typer.Option(3, min=1),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """The real ComfyUI KSampler per step, unsplit vs Mesh Split Model raw (ComfyUI's own blocks on a stage):
    step ratio, bytes per step, ComfyUI's loaded bytes and peak memory both ways."""
    from comfy_integration.bench import run_comfy_bench

    result = guard(lambda: run_comfy_bench(comfyui_path, arch=arch, hidden=hidden, blocks=blocks, size=size,
                                           steps=steps, repeats=repeats))
    emit(result, as_json, "mesh-ray bench comfy")


@bench_app.command("comfy-vae")
def bench_comfy_vae(comfyui_path: Optional[str] = typer.Option(None, help="ComfyUI source tree (default: $COMFYUI_PATH)."),
                    frames: int = typer.Option(25, min=1, help="LTX video frames (8k+1)."),
                    size: int = typer.Option(256, min=32, help="LTX video side in pixels (multiple of 32)."),
                    flux_size: int = typer.Option(512, min=8, help="FLUX image side in pixels (multiple of 8)."),
                    ltx_channels: int = typer.Option(32, min=8, help="LTX decoder base channels (the real one: 128)."),
                    flux_ch: int = typer.Option(64, min=32, help="FLUX decoder base channels (the real one: 128)."),
                    repeats: int = typer.Option(3, min=1),
                    as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """The ComfyUI process's peak memory while decoding: ComfyUI's VAE Decode here vs Mesh VAE Decode remote."""
    from comfy_integration.bench_vae import format_table, run_comfy_vae_bench

    result = guard(lambda: run_comfy_vae_bench(comfyui_path, frames=frames, size=size, flux_size=flux_size,
                                               ltx_channels=ltx_channels, flux_ch=flux_ch, repeats=repeats))
    emit_report(result, as_json, format_table)


@bench_app.command("comfy-queue")
def bench_comfy_queue(comfyui_path: Optional[str] = typer.Option(None, help="ComfyUI source tree (default: $COMFYUI_PATH)."),
                      prompts: int = typer.Option(6, min=1, help="Prompts of frontend B per measurement (A queues twice as many)."),
                      steps: int = typer.Option(8, min=1), size: int = typer.Option(256, min=16),
                      hidden: int = typer.Option(256, min=128, help="Model width (a multiple of 128)."),
                      rounds: int = typer.Option(2, min=1, help="Rounds of 1 worker then 2 workers, alternating."),
                      as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """ComfyUI prompts from two frontends through the dispatcher on 1 and 2 ComfyUI workers: speedup, fair share, lost."""
    from comfy_integration.queue_bench import format_table, run_comfy_queue_bench

    result = guard(lambda: run_comfy_queue_bench(comfyui_path, prompts=prompts, steps=steps, size=size, hidden=hidden,
                                                 rounds=rounds))
    emit_report(result, as_json, format_table)


@bench_app.command("faults")
def bench_faults(generations: int = typer.Option(20, min=2, help="Generations for the leak soak (the issue asks 200)."),
                 decodes: int = typer.Option(20, min=2, help="Promise decodes for the leak soak."),
                 clients: int = typer.Option(8, min=1), runs: int = typer.Option(2, min=1, help="Graphs per client."),
                 steps: int = typer.Option(4, min=1), size: int = typer.Option(64, min=16),
                 as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Every fault of docs/faults.md once on a local 3-node cluster: survived, outputs lost, extra seconds; leaks; load."""
    from mesh_ray.bench.faults import format_table, run_faults_bench

    result = guard(lambda: run_faults_bench(generations, decodes, clients, runs, steps, size))
    emit_report(result, as_json, format_table)



@bench_app.command("release", help="Peak memory at release levels 0, 1, 2 vs the minimum live set; goal: level 2 "
                                   f"within {goals.RELEASE['level2_over_min_live']:.0%}, "
                                   f">= {goals.RELEASE['level2_below_level0']:.0%} below 0.")
def bench_release(loader_mb: float = typer.Option(96.0, min=1, help="Size of each loader output, MB."),
                  heavy_mb: float = typer.Option(192.0, min=1, help="Size of the allocation-heavy node, MB."),
                  as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    from mesh_ray.bench.release import format_table, run_release_bench

    result = guard(lambda: run_release_bench(int(loader_mb * 1e6), int(heavy_mb * 1e6)))
    emit_report(result, as_json, format_table)
