"""``mesh-ray comfy workers``: ComfyUI workers on a running cluster (``comfy_integration/worker.py``)."""

from __future__ import annotations

from typing import Optional

import typer

from mesh_ray.cli.app import app
from mesh_ray.cli.output import guard, json_line

comfy_app = typer.Typer(no_args_is_help=True, help="ComfyUI on the cluster: workers that run whole prompts.")
app.add_typer(comfy_app, name="comfy")


@comfy_app.command("workers")
def workers_cmd(replicas: int = typer.Option(1, min=1, help="ComfyUI workers to run (one prompt at a time each)."),
                stop: bool = typer.Option(False, "--stop", help="Stop every ComfyUI worker instead."),
                comfyui: Optional[str] = typer.Option(None, help="The ComfyUI folder the workers run, the same as the "
                                                               "frontends' (default: $COMFYUI_PATH)."),
                custom_nodes: Optional[list[str]] = typer.Option(None, "--custom-nodes", metavar="DIR",
                                                                 help="A custom_nodes folder on the workers' nodes "
                                                                      "(repeatable)."),
                models: Optional[list[str]] = typer.Option(None, "--models", metavar="DIR",
                                                           help="A ComfyUI models folder on the workers' nodes "
                                                                "(repeatable); models only a frontend has are sent "
                                                                "once and cached per node."),
                extra_path: Optional[list[str]] = typer.Option(None, "--extra-path", metavar="DIR",
                                                               help="A folder for the workers' sys.path (repeatable)."),
                num_gpus: Optional[float] = typer.Option(None, min=0, help="GPUs per worker (default 1 when the "
                                                                           "cluster has GPUs, else 0; fractions allowed)."),
                num_cpus: float = typer.Option(1.0, min=0, help="CPUs per worker."),
                threads: Optional[int] = typer.Option(None, min=1, help="torch threads per worker."),
                ship: str = typer.Option("auto", help="Ship the ComfyUI code to the workers' nodes: auto, always, never."),
                address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS or 'auto')."),
                timeout: float = typer.Option(600.0, min=1, help="Seconds a worker may take to boot."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Start (or scale to) N named, detached ComfyUI workers and the dispatcher; `--stop` ends the workers."""
    from mesh_ray.cluster.connect import ray_address
    from mesh_ray.mesh import connect

    def body() -> dict:
        from comfy_integration.worker import start_workers, stop_workers

        connect(ray_address(address, "auto"))
        if stop:
            return {"stopped": stop_workers()}
        infos = start_workers(replicas, comfyui, tuple(custom_nodes or ()), tuple(models or ()), num_gpus, num_cpus,
                              threads, ship, tuple(extra_path or ()), timeout_s=timeout)
        return {"workers": infos}

    result = guard(body)
    if as_json:
        json_line(result)
    elif stop:
        print(f"stopped {len(result['stopped'])} ComfyUI workers: {', '.join(result['stopped']) or 'none ran'}")
    else:
        for w in result["workers"]:
            print(f"{w['name']}: ComfyUI {w['comfy_version']} on {w['device']} (node {w['node_id'][:12]}), "
                  f"{w['node_types']} node types, booted in {w['boot_s']} s")
        print("Queue from a ComfyUI with mesh-ray's nodes: the 'Queue on mesh' button or POST /mesh/queue.")
