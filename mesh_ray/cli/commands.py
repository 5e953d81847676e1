"""``mesh-ray demo / inspect / status / plan / doctor``: the commands about models and the cluster."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mesh_ray.cli.app import Arch, Codec, VaeMode, app
from mesh_ray.cli.output import emit, guard, int_list, json_line


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

    result = guard(lambda: run_demo(arch.value, stages, steps, size, seed, out, progress=not as_json,
                                   codec=codec.value, qp=qp, vae=vae.value if vae else None))
    emit(result, as_json, "mesh-ray demo")


@app.command("inspect")
def inspect_cmd(checkpoint: str = typer.Argument(..., help="A .safetensors FLUX checkpoint."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Architecture, preset, block counts and sizes from the safetensors header alone."""
    from mesh_ray.models.checkpoint import inspect

    info = guard(lambda: inspect(checkpoint))
    emit(info.summary(), as_json, f"mesh-ray inspect {checkpoint}")


@app.command()
def status(address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS or 'auto')."),
           as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Nodes with their resources, the mesh actors on each (block range, device, memory), where this driver is."""
    from mesh_ray.cluster.connect import ray_address
    from mesh_ray.mesh import connect
    from mesh_ray.cluster.status import collect, render

    result = guard(lambda: collect(connect(ray_address(address, "auto"))))
    if as_json:
        json_line(result)
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
             front: str = typer.Option("auto", help="Where the embedders and final layer run: caller, stage, or auto "
                                                    "(the stages when the caller is the bottleneck and that is faster)."),
             address: Optional[str] = typer.Option(None, help="Ray address (default: embedded local Ray)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line.")) -> None:
    """Measure the candidate devices and the caller, then print block ranges per stage, predicted images/s and the bottleneck."""
    from mesh_ray.mesh import connect
    from mesh_ray.split.planner import auto_plan
    from mesh_ray.actors.profiling import tokens_for

    def body():
        tokens_for(width, height)  # a bad size fails before Ray starts
        per = list(int_list(threads or None, "--threads", "2,1") or []) or None
        connect(address, num_cpus=max(len(per or []) + 1, (stages or 2) + 1, 2) if address is None else None)
        return auto_plan(checkpoint, stages, per, width=width, height=height, txt_tokens=txt_tokens, steps=steps,
                         in_flight=in_flight, dtype=dtype, repeats=repeats, front=front)

    plan = guard(body)
    if as_json:
        json_line(plan.model_dump())
    else:
        print(plan.table())


@app.command()
def doctor() -> None:
    """Which codec backends and activation transports work on this machine, and why not where they do not."""
    from mesh_ray.cluster.transports import probe_transports
    from mesh_ray.codec import probe_backends

    Console().print(doctor_table(probe_backends()))
    Console().print(doctor_table(probe_transports(), "transports", "transport"))


def doctor_table(rows: list, title: str = "codec backends", what: str = "backend") -> Table:
    """The doctor rows as a table; reasons are printed verbatim (they hold text like ``mesh-ray[video]``)."""
    from rich.markup import escape

    table = Table(title=title)
    for col in (what, "usable", "reason"):
        table.add_column(col)
    for s in rows:
        table.add_row(s.name, "yes" if s.usable else "no", escape(s.reason))
    return table
