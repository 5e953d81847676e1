"""Graph validation: every problem is one line naming the node and the fix (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh_ray.errors import ConfigError
from mesh_ray.workflow import load_graph, node_types, validate_graph

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _err(graph) -> str:
    with pytest.raises(ConfigError) as e:
        validate_graph(graph)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_unknown_type_names_node_and_suggests():
    msg = _err({"7": {"class_type": "Passthru", "inputs": {"value": 1}}})
    assert "node '7'" in msg and "'Passthru'" in msg and "did you mean 'Passthrough'" in msg


def test_missing_and_unknown_inputs():
    msg = _err({"1": {"class_type": "Checksum", "inputs": {}}})
    assert "node '1' (Checksum) is missing input 'data'" in msg
    msg = _err({"1": {"class_type": "Passthrough", "inputs": {"value": 1, "valu": 2}}})
    assert "node '1' (Passthrough) has no input 'valu'" in msg


def test_links_to_missing_node_or_output():
    msg = _err({"1": {"class_type": "Passthrough", "inputs": {"value": ["9", 0]}}})
    assert "node '1' input 'value' links to node '9'" in msg and "not in the graph" in msg
    msg = _err({"1": {"class_type": "Passthrough", "inputs": {"value": 3}},
                "2": {"class_type": "Passthrough", "inputs": {"value": ["1", 4]}}})
    assert "output 4 of node '1' (Passthrough)" in msg and "use an index from 0 to 0" in msg


def test_cycle_is_named():
    msg = _err({"a": {"class_type": "Passthrough", "inputs": {"value": ["c", 0]}},
                "b": {"class_type": "Passthrough", "inputs": {"value": ["a", 0]}},
                "c": {"class_type": "Passthrough", "inputs": {"value": ["b", 0]}},
                "d": {"class_type": "Passthrough", "inputs": {"value": ["c", 0]}}})
    assert "cycle" in msg and "->" in msg and any(f"node '{n}' is part of a cycle" in msg for n in "abc")
    assert "'d'" not in msg  # downstream of the cycle, not on it


def test_malformed_graphs():
    assert "non-empty JSON object" in _err([1, 2])
    assert "non-empty JSON object" in _err({})
    assert "node '1' is a str" in _err({"1": "Passthrough"})
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
    assert list(load_graph(wrapped).nodes) == ["1"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_examples_validate(path):
    g = load_graph(path)
    assert g.order and set(g.order) == set(g.nodes)


def test_builtins_registered():
    names = set(node_types())
    assert {"LoadSplitDiT", "Sample", "VAEDecode", "SaveImage", "SavePromisedImage", "AllocateMemory",
            "Passthrough", "ExpandLink"} <= names
