"""The ``mesh-ray`` command line: thin wrappers that print a table for people or one JSON line for machines."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mesh_ray.bench import goals
from mesh_ray.cli_common import guard as _run
from mesh_ray.names import VAE_MODES
from mesh_ray.errors import MeshError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run FLUX diffusion transformers across the GPUs of a Ray cluster.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")


class Arch(str, Enum):
    flux1 = "flux1"
    flux2 = "flux2"


VaeMode = Enum("VaeMode", {m: m for m in VAE_MODES}, type=str)  # the decode modes, named once in config.py


class Codec(str, Enum):
    raw = "raw"
    quant8 = "quant8"
    hevc = "hevc"
    auto = "auto"


def _emit(result: dict, as_json: bool, title: str) -> None:
    """A table on stdout for people; with --json, instead one JSON object as the last stdout line."""
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table(title=title, show_header=True)
    table.add_column("key")
    table.add_column("value")
    for k, v in result.items():
        table.add_row(str(k), json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    Console().print(table)


@app.command()
def demo(arch: Arch = typer.Option(Arch.flux1, help="FLUX.1 or FLUX.2 tiny model."),
         stages: int = typer.Option(2, min=1, help="Number of stage actors."),
         steps: int = typer.Option(4, min=1, help="Sampler steps."),
         size: int = typer.Option(256, min=16, help="Image size in pixels (multiple of 16)."),
         seed: int = typer.Option(0, help="Seed for weights, conditioning and noise."),
         out: str = typer.Option("out", help="Directory for the PNG."),
         codec: Codec = typer.Option(Codec.raw, help="How activations are coded on every link."),
         qp: Optional[int] = typer.Option(None, min=0, max=51, help="HEVC quantisation parameter (hevc only)."),
         vae: Optional[VaeMode] = typer.Option(None, help="Decode on a VAE decoder actor: wait, forget or promise."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Split a seeded tiny FLUX model over stages on an embedded Ray, generate, compare with one process."""
    from mesh_ray.demo import run_demo

    result = _run(lambda: run_demo(arch.value, stages, steps, size, seed, out, progress=not as_json,
                                   codec=codec.value, qp=qp, vae=vae.value if vae else None))
    _emit(result, as_json, "mesh-ray demo")


@app.command("inspect")
def inspect_cmd(checkpoint: str = typer.Argument(..., help="A .safetensors FLUX checkpoint."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Architecture, preset, block counts and sizes from the safetensors header alone."""
    from mesh_ray.models.checkpoint import inspect

    info = _run(lambda: inspect(checkpoint))
    _emit(info.summary(), as_json, f"mesh-ray inspect {checkpoint}")


@app.command()
def status(address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS or 'auto')."),
           as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Nodes with their resources, the mesh actors on each (block range, device, memory), where this driver is."""
    from mesh_ray.cluster import ray_address
    from mesh_ray.mesh import connect
    from mesh_ray.status import collect, render

    result = _run(lambda: collect(connect(ray_address(address, "auto"))))
    if as_json:
        print(json.dumps(result, default=str))
    else:
        render(result)


@app.command("plan")
def plan_cmd(checkpoint: str = typer.Argument(..., help="A .safetensors FLUX checkpoint."),
             stages: Optional[int] = typer.Option(None, min=1, help="Candidate devices (default: every GPU, or 2 CPU stages)."),
             threads: Optional[str] = typer.Option(None, help="CPU: torch threads per candidate stage, e.g. 2,1."),
             width: int = typer.Option(1024, min=16), height: int = typer.Option(1024, min=16),
             txt_tokens: int = typer.Option(512, min=1), steps: int = typer.Option(20, min=1),
             in_flight: Optional[int] = typer.Option(None, min=1, help="Images in flight (default: stages + 1)."),
             dtype: str = typer.Option("auto"), repeats: int = typer.Option(3, min=1),
             address: Optional[str] = typer.Option(None, help="Ray address (default: embedded local Ray)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Measure the candidate devices and the caller, then print block ranges per stage, predicted images/s and the bottleneck."""
    from mesh_ray.mesh import connect
    from mesh_ray.planner import auto_plan
    from mesh_ray.profiling import tokens_for

    def body():
        tokens_for(width, height)  # a bad size fails before Ray starts
        per = None
        if threads:
            try:
                per = [int(t) for t in threads.split(",")]
            except ValueError:
                raise MeshError(f"--threads {threads!r} is not a comma-separated list of integers: use e.g. 2,1") from None
        connect(address, num_cpus=max(len(per or []) + 1, (stages or 2) + 1, 2) if address is None else None)
        return auto_plan(checkpoint, stages, per, width=width, height=height, txt_tokens=txt_tokens, steps=steps,
                         in_flight=in_flight, dtype=dtype, repeats=repeats)

    plan = _run(body)
    if as_json:
        print(json.dumps(plan.model_dump(), default=str))
    else:
        print(plan.table())


@bench_app.command("split", help="Split vs local forward at the FLUX 1024x1024 token count (raw mode); "
                                   f"goal ratio <= {goals.SPLIT['ratio_split_over_local']}.")
def bench_split(arch: Arch = typer.Option(Arch.flux1), hidden: int = typer.Option(512, min=64),
                heads: int = typer.Option(4, min=1), depth: int = typer.Option(1, min=0),
                single: int = typer.Option(3, min=0), image_tokens: int = typer.Option(4096, min=1),
                txt_tokens: int = typer.Option(512, min=1), stages: int = typer.Option(2, min=1),
                repeats: int = typer.Option(3, min=1),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    from mesh_ray.bench.split import run_split_bench

    result = _run(lambda: run_split_bench(arch.value, hidden, heads, depth, single, image_tokens, txt_tokens, stages, repeats))
    _emit(result, as_json, "mesh-ray bench split")


@bench_app.command("pipeline")
def bench_pipeline(quick: bool = typer.Option(False, "--quick", help="256px, 2 steps, 64 text tokens: a smoke run."),
                   stages: int = typer.Option(2, min=1), in_flight: str = typer.Option("1,2,4,8", help="M values."),
                   steps: Optional[int] = typer.Option(None, min=1), size: Optional[int] = typer.Option(None, min=16),
                   threads: int = typer.Option(1, min=1, help="torch threads per stage and for the single process."),
                   images: Optional[int] = typer.Option(None, min=1, help="Images per measurement (default 2*M, at least 4)."),
                   hand_plans: bool = typer.Option(True, help="Also measure every hand plan of two stages."),
                   rounds: Optional[int] = typer.Option(None, min=1, help="Interleaved rounds of planner vs hand plans."),
                   stage_threads: Optional[str] = typer.Option(None, help="Threads per stage for the planner section, e.g. 2,1."),
                   as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """One process vs K stages with M images in flight: throughput ratio, bubble fraction, planner predicted vs measured."""
    from mesh_ray.bench.pipeline import format_table, run_pipeline_bench

    def body() -> dict:
        try:
            ms = tuple(int(m) for m in in_flight.split(","))
        except ValueError:
            raise MeshError(f"--in-flight {in_flight!r} is not a comma-separated list of integers: use e.g. 1,2,4,8") from None
        try:
            per = tuple(int(t) for t in stage_threads.split(",")) if stage_threads else None
        except ValueError:
            raise MeshError(f"--stage-threads {stage_threads!r} is not a comma-separated list of integers: use e.g. 2,1") from None
        return run_pipeline_bench(quick, stages, ms, steps, size, None, threads, images, hand_plans, rounds, per)

    result = _run(body)
    print(format_table(result))
    if as_json:
        print(json.dumps(result, default=str))


@bench_app.command("codec")
def bench_codec(quick: bool = typer.Option(False, "--quick", help="Small tensors: seconds instead of a minute."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Every codec mode/QP on the standard activation set (captured tiny-FLUX + synthetic), vs bf16 raw."""
    from mesh_ray.bench.codec import format_table, run_codec_bench

    result = _run(lambda: run_codec_bench(quick=quick))
    print(format_table(result))
    if as_json:
        print(json.dumps(result, default=str))


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
        try:
            wins = tuple(int(w) for w in windows.split(","))
        except ValueError:
            raise MeshError(f"--windows {windows!r} is not a comma-separated list of integers: use e.g. 1,2,4,8") from None
        return run_offload_bench(hidden, tokens, blocks, wins, budget_fraction, quick, steps=steps, device=device, dtype=dtype)

    result = _run(body)
    print(format_table(result))
    if as_json:
        print(json.dumps(result, default=str))


@bench_app.command("vae", help="Wait vs Promise decoding over several generations, side by side; goal ratio >= "
                                 f"{goals.VAE['throughput_ratio_promise_over_wait']}, "
                                 f"< {goals.VAE['blocked_ms_per_image_promise']:g} ms blocked.")
def bench_vae(generations: int = typer.Option(6, min=2), size: int = typer.Option(512, min=16),
              rounds: int = typer.Option(2, min=1), threads: int = typer.Option(1, min=1),
              as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    from mesh_ray.bench.vae import format_table, run_vae_bench

    result = _run(lambda: run_vae_bench(generations=generations, size=size, rounds=rounds, threads=threads))
    print(format_table(result))
    if as_json:
        print(json.dumps(result, default=str))


@bench_app.command("faults")
def bench_faults(generations: int = typer.Option(20, min=2, help="Generations for the leak soak (the issue asks 200)."),
                 decodes: int = typer.Option(20, min=2, help="Promise decodes for the leak soak."),
                 clients: int = typer.Option(8, min=1), runs: int = typer.Option(2, min=1, help="Graphs per client."),
                 steps: int = typer.Option(4, min=1), size: int = typer.Option(64, min=16),
                 as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Every fault of docs/faults.md once on a local 3-node cluster: survived, outputs lost, extra seconds; leaks; load."""
    from mesh_ray.bench.faults import format_table, run_faults_bench

    result = _run(lambda: run_faults_bench(generations, decodes, clients, runs, steps, size))
    print(format_table(result))
    if as_json:
        print(json.dumps(result, default=str))


@app.command()
def doctor() -> None:
    """Which codec backends work on this machine, and why not where they do not."""
    from mesh_ray.codec import probe_backends

    Console().print(doctor_table(probe_backends()))


def doctor_table(rows: list) -> Table:
    """The doctor rows as a table; reasons are printed verbatim (they hold text like ``mesh-ray[video]``)."""
    from rich.markup import escape

    table = Table(title="codec backends")
    for col in ("backend", "usable", "reason"):
        table.add_column(col)
    for s in rows:
        table.add_row(s.name, "yes" if s.usable else "no", escape(s.reason))
    return table


def _register_workflow_commands() -> None:
    """`run`, `serve` and `bench release` live with the workflow package."""
    from mesh_ray.cli_workflow import register

    register(app, bench_app)


_register_workflow_commands()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
