"""The ``mesh-ray`` command line: thin wrappers that print a table for people or one JSON line for machines."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mesh_ray.cli_common import guard as _run
from mesh_ray.errors import MeshError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run FLUX diffusion transformers across the GPUs of a Ray cluster.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")


class Arch(str, Enum):
    flux1 = "flux1"
    flux2 = "flux2"


class VaeMode(str, Enum):
    wait = "wait"
    forget = "forget"
    promise = "promise"


class Codec(str, Enum):
    raw = "raw"
    quant8 = "quant8"
    hevc = "hevc"
    auto = "auto"


def _emit(result: dict, as_json: bool, title: str) -> None:
    """A table on stderr for people; with --json, one JSON object as the last stdout line."""
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
    """Cluster resources and the mesh actors (kind, block range, node, GPU, memory)."""
    import os

    from mesh_ray.mesh import connect

    def body() -> dict:
        return connect(address or os.environ.get("RAY_ADDRESS") or "auto").status()

    result = _run(body)
    if as_json:
        print(json.dumps(result, default=str))
        return
    c = Console()
    c.print(f"mode: {result['mode']}")
    res = Table(title="resources")
    for col in ("resource", "total", "available"):
        res.add_column(col)
    for k, v in sorted(result["total"].items()):
        if not k.startswith(("node:", "bundle_group", "memory", "object_store_memory")):
            res.add_row(k, f"{v:g}", f"{result['available'].get(k, 0):g}")
    c.print(res)
    act = Table(title="mesh actors")
    for col in ("name", "kind", "blocks", "node", "device", "weights MB", "rss MB"):
        act.add_column(col)
    for a in result["actors"]:
        act.add_row(a["name"], a.get("kind", "?"), a.get("blocks", ""), a.get("node_ip", ""), a.get("device", ""),
                    f"{a.get('weight_bytes', 0) / 1e6:.1f}", f"{(a.get('rss_bytes') or 0) / 1e6:.0f}")
    c.print(act)


@bench_app.command("split")
def bench_split(arch: Arch = typer.Option(Arch.flux1), hidden: int = typer.Option(512, min=64),
                heads: int = typer.Option(4, min=1), depth: int = typer.Option(1, min=0),
                single: int = typer.Option(3, min=0), image_tokens: int = typer.Option(4096, min=1),
                txt_tokens: int = typer.Option(512, min=1), stages: int = typer.Option(2, min=1),
                repeats: int = typer.Option(3, min=1),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Split vs local forward at the FLUX 1024x1024 token count (raw mode); goal ratio <= 1.05."""
    from mesh_ray.bench.split import run_split_bench

    result = _run(lambda: run_split_bench(arch.value, hidden, heads, depth, single, image_tokens, txt_tokens, stages, repeats))
    _emit(result, as_json, "mesh-ray bench split")


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


@bench_app.command("vae")
def bench_vae(generations: int = typer.Option(6, min=2), size: int = typer.Option(512, min=16),
              rounds: int = typer.Option(2, min=1), threads: int = typer.Option(1, min=1),
              as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Wait vs Promise decoding over several generations, side by side; goal ratio >= 1.6, < 5 ms blocked."""
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

    table = Table(title="codec backends")
    for col in ("backend", "usable", "reason"):
        table.add_column(col)
    for s in probe_backends():
        table.add_row(s.name, "yes" if s.usable else "no", s.reason)
    Console().print(table)


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
