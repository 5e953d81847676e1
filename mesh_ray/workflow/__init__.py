"""Workflows: ComfyUI API-format graphs run on Ray, with release levels 0/1/2 and many clients.

    from mesh_ray.workflow import run_graph, Workflows
    result = run_graph("examples/flux_tiny_vae.json", release_level=2)     # embedded, one call
    run_graph("examples/release_scenario.json", 2, node_modules=[TESTING_NODES])  # + the testing node types
    wf = Workflows.connect()            # the `mesh-ray serve` service when running, else embedded
    run = wf.submit(graph, release_level=2); run.events(); run.result(timeout=600); run.cancel()
"""

from mesh_ray.workflow.executor import Executor, RunResult, WorkflowError
from mesh_ray.workflow.graph import Graph, NodeSpec, is_link, load_graph, validate_graph
from mesh_ray.workflow.modules import TESTING_NODES, node_types
from mesh_ray.workflow.registry import Expansion, NodeType, node
from mesh_ray.workflow.service import RunHandle, Workflows, find_service, run_graph, serve, stop_service

__all__ = ["Executor", "Expansion", "Graph", "NodeSpec", "NodeType", "RunHandle", "RunResult", "TESTING_NODES",
           "WorkflowError",
           "Workflows", "find_service", "is_link", "load_graph", "node", "node_types", "run_graph", "serve",
           "stop_service", "validate_graph"]
