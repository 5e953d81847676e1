"""``mesh-ray run / serve``: workflow graphs on the cluster (or embedded) and the shared service."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mesh_ray.cli.app import app
from mesh_ray.cli.output import err_console, guard, json_line


class _Display:
    """A rich progress display on stderr: nodes done of total, and one bar per sampler."""

    def __init__(self, total_nodes: int, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=err_console, disable=not enabled, transient=False)
        self.nodes = self.progress.add_task("nodes", total=total_nodes)
        self.seen: set[str] = set()
        self.steps: dict[str, Any] = {}

    def __enter__(self) -> "_Display":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, ev: dict) -> None:
        from mesh_ray.workflow.events import describe

        kind, nid = ev["type"], ev.get("node")
        if kind == "node_started" and nid not in self.seen:
            self.seen.add(nid)
            task = self.progress.tasks[self.nodes]
            if len(self.seen) > (task.total or 0):
                self.progress.update(self.nodes, total=len(self.seen))
        elif kind in ("node_finished", "node_cached"):
            self.progress.advance(self.nodes)
        elif kind == "progress":
            if nid not in self.steps:
                self.steps[nid] = self.progress.add_task(f"node {nid} steps", total=ev["total"])
            self.progress.update(self.steps[nid], completed=ev["step"], total=ev["total"])
        if self.enabled and kind in ("node_rerun", "node_failed", "node_cached"):
            self.progress.console.print(describe(ev), highlight=False, soft_wrap=True)


def _summary(result: Any) -> None:
    from mesh_ray.workflow.memory import fmt_bytes

    table = Table(title=f"run {result.run_id}: {result.status} in {result.seconds:.2f} s "
                        f"(release level {result.release_level})")
    table.add_column("node")
    table.add_column("outputs")
    for nid, values in result.outputs.items():
        table.add_row(nid, json.dumps(values, default=str))
    Console().print(table)
    Console().print(f"peak live outputs {fmt_bytes(result.peak_live_bytes)}, object store peak "
                    f"{fmt_bytes(result.peak_store_bytes)}; re-executed: {', '.join(result.reexecuted) or 'none'}; "
                    f"cached: {', '.join(result.cached) or 'none'}", highlight=False)



@app.command("run")
def run_cmd(graph: str = typer.Argument(..., help="Workflow graph in ComfyUI API format (JSON)."),
            release_level: int = typer.Option(0, "--release-level", min=0, max=2,
                                              help="0 keep all, 1 drop unreferenced, 2 drop after the last consumer."),
            address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS, else embedded)."),
            service: Optional[bool] = typer.Option(None, "--service/--no-service",
                                                   help="Use the `mesh-ray serve` service (default: when it runs)."),
            timeout: float = typer.Option(3600.0, min=1, help="Seconds the run may take."),
            nodes: Optional[list[str]] = typer.Option(
                None, "--nodes", metavar="MODULE",
                help="A module of extra node types to import where the graph runs (repeatable), e.g. "
                     "mesh_ray.workflow.testing_nodes; allowed: modules under MESH_RAY_NODE_MODULE_PREFIXES "
                     "(default mesh_ray.)."),
            as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object (last line).")) -> None:
    """Run a workflow graph on the cluster (or embedded) with a progress display."""
    from mesh_ray.cluster.connect import ray_address
    from mesh_ray.workflow.graph import read_graph, validate_graph
    from mesh_ray.workflow.service import Workflows

    def body() -> Any:
        raw = read_graph(graph)
        here = ray_address(address) is None or service is False  # it runs in this process: check before Ray starts
        data = validate_graph(raw, modules=nodes or ()) if here else raw
        wf = Workflows.connect(address, service=service)
        try:
            handle = wf.submit(data, release_level, timeout_s=timeout, node_modules=nodes)  # else the service checks
            with _Display(len(raw), enabled=not as_json) as display:
                result = handle.wait(timeout, on_event=display, check=False)
        finally:
            wf.close()
        return result.raise_for_status()

    result = guard(body)
    if as_json:
        json_line(result.to_dict())
    else:
        _summary(result)

@app.command("serve")
def serve_cmd(address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or 'auto')."),
              max_parallel: int = typer.Option(2, min=1, help="Runs executing at once across clients."),
              stop: bool = typer.Option(False, "--stop", help="Stop the running service instead."),
              as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Start the shared workflow service (named, detached) on a running Ray cluster."""
    from mesh_ray.cluster.connect import ray_address
    from mesh_ray.mesh import connect
    from mesh_ray.workflow.service import SERVICE_NAME, serve, stop_service

    def body() -> dict:
        connect(ray_address(address, "auto"))
        if stop:
            return {"stopped": stop_service(), "name": SERVICE_NAME}
        return {**serve(max_parallel), "name": SERVICE_NAME}

    info = guard(body)
    if as_json:
        json_line(info)
    elif stop:
        print(f"workflow service {'stopped' if info['stopped'] else 'was not running'}")
    else:
        print(f"workflow service {info['name']} is running (pid {info['pid']}, {info['runs']} runs so far).\n"
              f"Clients: `mesh-ray run GRAPH.json --address {address or 'auto'}` or "
              f"mesh_ray.workflow.Workflows.connect(address).\n"
              f"Stop it with `mesh-ray serve --stop{' --address ' + address if address else ''}` (or `ray stop` on the head).")
