"""Graph validation: every problem is one line naming the node and the fix (no Ray needed)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from mesh_ray.errors import ConfigError
from mesh_ray.workflow import TESTING_NODES, load_graph, node_types, validate_graph
from mesh_ray.workflow.modules import allowed_prefixes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TESTING = [TESTING_NODES]


def _err(graph, modules=(), existing=None) -> str:
    with pytest.raises(ConfigError) as e:
        validate_graph(graph, modules=modules, existing=existing)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def _doc_messages() -> list[str]:
    """The example messages of docs/workflow.md's table of graph problems."""
    text = (ROOT / "docs" / "workflow.md").read_text()
    table = text[text.index("| problem | message (example) |"):].split("\n\n")[0]
    return re.findall(r"^\| [a-z ]+ \| `(.+)` \|$", table, flags=re.M)


# the graph behind each message of the docs' table, in its order (built-in node types only)
DOC_GRAPHS = [
    {"7": {"class_type": "SaveImg", "inputs": {}}},
    {"1": {"class_type": "SaveImage", "inputs": {}}},
    {"1": {"class_type": "LatentPreview", "inputs": {"latent": 1, "latnt": 2}}},
    {"1": {"class_type": "LatentPreview", "inputs": {"latent": ["9", 0]}}},
    {"1": {"class_type": "WriteRandomVAE", "inputs": {"path": "v.safetensors"}},
     "2": {"class_type": "LatentPreview", "inputs": {"latent": ["1", 4]}}},
    {"a": {"class_type": "LatentPreview", "inputs": {"latent": ["c", 0]}},
     "b": {"class_type": "LatentPreview", "inputs": {"latent": ["a", 0]}},
     "c": {"class_type": "LatentPreview", "inputs": {"latent": ["b", 0]}}},
]


def test_docs_table_messages_are_the_real_ones():
    docs = _doc_messages()
    assert len(docs) == len(DOC_GRAPHS)
    for graph, doc in zip(DOC_GRAPHS, docs):
        msg = _err(graph)
        head, _, tail = doc.partition("…")  # the docs shorten the list of known types
        assert msg.startswith(head) and msg.endswith(tail), (msg, doc)


def test_unknown_type_names_node_and_suggests():
    msg = _err({"7": {"class_type": "Passthru", "inputs": {"value": 1}}}, TESTING)
    assert "node '7'" in msg and "'Passthru'" in msg and "did you mean 'Passthrough'" in msg


def test_missing_and_unknown_inputs():
    msg = _err({"1": {"class_type": "Checksum", "inputs": {}}}, TESTING)
    assert "node '1' (Checksum) is missing input 'data'" in msg
    msg = _err({"1": {"class_type": "Passthrough", "inputs": {"value": 1, "valu": 2}}}, TESTING)
    assert "node '1' (Passthrough) has no input 'valu'" in msg


def test_links_to_missing_node_or_output():
    msg = _err({"1": {"class_type": "Passthrough", "inputs": {"value": ["9", 0]}}}, TESTING)
    assert "node '1' input 'value' links to node '9'" in msg and "not in the graph" in msg
    msg = _err({"1": {"class_type": "Passthrough", "inputs": {"value": 3}},
                "2": {"class_type": "Passthrough", "inputs": {"value": ["1", 4]}}}, TESTING)
    assert "output 4 of node '1' (Passthrough)" in msg and "use an index from 0 to 0" in msg


def test_cycle_is_named():
    msg = _err({"a": {"class_type": "Passthrough", "inputs": {"value": ["c", 0]}},
                "b": {"class_type": "Passthrough", "inputs": {"value": ["a", 0]}},
                "c": {"class_type": "Passthrough", "inputs": {"value": ["b", 0]}},
                "d": {"class_type": "Passthrough", "inputs": {"value": ["c", 0]}}}, TESTING)
    assert "cycle" in msg and "->" in msg and any(f"node '{n}' is part of a cycle" in msg for n in "abc")
    assert "'d'" not in msg  # downstream of the cycle, not on it


def test_malformed_graphs():
    assert "non-empty JSON object" in _err([1, 2])
    assert "non-empty JSON object" in _err({})
    assert "node '1' is a str" in _err({"1": "SaveImage"})
    assert "node '1' field 'class_type'" in _err({"1": {"inputs": {}}})


def test_load_graph_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_graph(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_graph(tmp_path / "missing.json")
    wrapped = tmp_path / "prompt.json"
    wrapped.write_text(json.dumps({"prompt": {"1": {"class_type": "Passthrough", "inputs": {"value": 1}}}}))
    g = load_graph(wrapped, TESTING)
    assert list(g.nodes) == ["1"] and g.modules == (TESTING_NODES,)


TESTING_TYPES = {"AllocateMemory", "Checksum", "EmptyImage", "ExpandLink", "Fail", "Passthrough", "Sleep"}


def test_builtins_do_not_include_the_testing_nodes():
    import mesh_ray.workflow.testing_nodes  # noqa: F401 - imported in this process: still not built in

    names = set(node_types())
    assert {"LoadSplitDiT", "Sample", "SampleMany", "VAEDecode", "SaveImage", "SavePromisedImage", "LoadVAE",
            "LatentPreview", "WriteRandomCheckpoint", "WriteRandomVAE"} == names
    assert set(node_types(TESTING)) == names | TESTING_TYPES
    assert all(t.module == TESTING_NODES for n, t in node_types(TESTING).items() if n in TESTING_TYPES)


@pytest.mark.parametrize("name", sorted(TESTING_TYPES))
def test_testing_node_without_its_module_is_one_line_naming_the_option(name):
    msg = _err({"1": {"class_type": name, "inputs": {}}})
    assert msg == (f"node '1' has unknown class_type {name!r}: it is a node type of module {TESTING_NODES}, which this "
                   f"run does not load: pass --nodes {TESTING_NODES} (node_modules=[{TESTING_NODES!r}] in Python)")


def test_expansion_sees_only_the_modules_of_its_graph():
    """An expansion's nodes are checked against the running graph's modules, not whatever is imported."""
    running = validate_graph({"1": {"class_type": "SaveImage", "inputs": {"images": 1}}})
    msg = _err({"x": {"class_type": "Passthrough", "inputs": {"value": 1}}}, existing=running)
    assert "unknown class_type 'Passthrough'" in msg and f"--nodes {TESTING_NODES}" in msg
    with_testing = validate_graph({"1": {"class_type": "Passthrough", "inputs": {"value": 1}}}, modules=TESTING)
    sub = validate_graph({"x": {"class_type": "Passthrough", "inputs": {"value": ["1", 0]}}}, existing=with_testing)
    assert sub.modules == (TESTING_NODES,)


@pytest.mark.parametrize("module, why", [
    ("json", "is not allowed (allowed: mesh_ray.)"),
    ("mesh_rayx.nodes", "is not allowed (allowed: mesh_ray.)"),
    ("mesh_ray.cli.__main__", "is not a module name"),
    ("../evil", "is not a module name"),
    ("mesh_ray.no_such_module", "cannot be imported (ModuleNotFoundError"),
    ("mesh_ray.errors", "defines no node types"),
])
def test_node_modules_outside_the_allow_list_or_bad_are_refused(module, why, monkeypatch):
    import sys

    monkeypatch.delenv("MESH_RAY_NODE_MODULE_PREFIXES", raising=False)
    before = set(sys.modules)
    msg = _err({"1": {"class_type": "SaveImage", "inputs": {"images": 1}}}, [module])
    assert msg.startswith(f"node module {module!r} {why}") and ": " in msg
    if "allowed" in why:
        assert "MESH_RAY_NODE_MODULE_PREFIXES" in msg and module not in set(sys.modules) - before


def test_operator_setting_widens_or_narrows_the_allow_list(monkeypatch, tmp_path):
    pkg = tmp_path / "meshtest_nodes_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "extra.py").write_text(textwrap.dedent("""
        from mesh_ray.workflow import node

        @node("MeshTestDouble", outputs=("VALUE",))
        def double(value: int) -> int:
            return 2 * value

        @node("Sleep", outputs=("VALUE",))  # the name of a testing node: each module is its own namespace
        def no_sleep(seconds: float) -> float:
            return seconds
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = {"1": {"class_type": "MeshTestDouble", "inputs": {"value": 2}}}
    assert "is not allowed" in _err(graph, ["meshtest_nodes_pkg.extra"])
    monkeypatch.setenv("MESH_RAY_NODE_MODULE_PREFIXES", "mesh_ray.,meshtest_nodes_pkg.")
    g = validate_graph(graph, modules=["meshtest_nodes_pkg.extra"])
    assert g.types["1"].module == "meshtest_nodes_pkg.extra"
    assert "unknown class_type 'MeshTestDouble'" in _err(graph)  # imported, but this graph does not name it
    sleep = {"1": {"class_type": "Sleep", "inputs": {"seconds": 1}}}
    assert validate_graph(sleep, modules=["meshtest_nodes_pkg.extra"]).types["1"].module == "meshtest_nodes_pkg.extra"
    assert validate_graph(sleep, modules=TESTING).types["1"].module == TESTING_NODES
    assert _err(sleep, ["meshtest_nodes_pkg.extra", *TESTING]) == (
        f"node type 'Sleep' is defined in both meshtest_nodes_pkg.extra and {TESTING_NODES}: name only one of these modules")
    monkeypatch.setenv("MESH_RAY_NODE_MODULE_PREFIXES", '["mesh_ray", "meshtest_nodes_pkg"]')  # a JSON list works too
    assert allowed_prefixes() == ("mesh_ray", "meshtest_nodes_pkg")
    monkeypatch.setenv("MESH_RAY_NODE_MODULE_PREFIXES", "")  # empty: no node module at all
    assert "is not allowed (allowed: none)" in _err(sleep, TESTING)
    monkeypatch.setenv("MESH_RAY_NODE_MODULE_PREFIXES", "meshtest_nodes_pkg")  # narrowed: no testing nodes
    assert "is not allowed (allowed: meshtest_nodes_pkg)" in _err({"1": {"class_type": "Sleep", "inputs": {}}}, TESTING)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_examples_validate(path):
    g = load_graph(path, TESTING)
    assert g.order and set(g.order) == set(g.nodes)
