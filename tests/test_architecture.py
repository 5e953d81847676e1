"""The house's walls, read from the source with ``ast`` (docs/architecture.md draws them):

* the import graph of ``mesh_ray`` has no cycle (lazy and type-checking imports count too);
* imports go down the layers only (``LAYERS``): actors never import what drives them, models,
  codec and memory never import Ray;
* no module of ``mesh_ray`` or ``comfy_integration`` imports a ``_private`` name of another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top; a module may import from its own room or from a lower layer.
LAYERS = [
    {"errors", "names", "digest", "tables"},
    {"codec", "memory", "models"},
    {"config"},
    {"cluster"},
    {"actors"},
    {"split", "vae"},
    {"mesh"},
    {"workflow", "demo"},
    {"bench"},
    {"cli"},
]
NO_RAY = {"errors", "names", "digest", "tables", "codec", "memory", "models", "config"}


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package``."""
    out = {}
    for p in sorted((ROOT / package).rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, anywhere in it."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package this module is in
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # ``from pkg import module``: an edge to the module itself
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mesh_ray" and len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    known = modules("mesh_ray")
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for target, _names, _line in imports(name, path, known):
            while target and target not in known:  # ``import mesh_ray.x.y`` or an attribute path
                target = target.rpartition(".")[0]
            if target and target != name and target != "mesh_ray":
                edges[name].add(target)
    return edges


def test_mesh_ray_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_go_down_the_layers():
    rank = {r: i for i, layer in enumerate(LAYERS) for r in layer}
    edges = graph()
    unknown = {room(m) for m in edges if room(m) and room(m) not in rank}
    assert not unknown, f"rooms missing from LAYERS (add them where they belong): {sorted(unknown)}"
    upward = [f"{a} -> {b}" for a, bs in edges.items() for b in bs
              if room(a) and room(b) and room(a) != room(b) and rank[room(b)] > rank[room(a)]]
    assert not upward, "imports that run back up: " + ", ".join(sorted(upward))


def test_models_codec_memory_and_config_know_nothing_about_ray():
    known = modules("mesh_ray")
    bad = [f"{name}:{line}" for name, path in known.items() if room(name) in NO_RAY
           for target, _n, line in imports(name, path, known) if target == "ray" or target.startswith("ray.")]
    assert not bad, "Ray imported below the cluster layer: " + ", ".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for package in ("mesh_ray", "comfy_integration"):
        known = modules(package)
        for name, path in known.items():
            for target, names, line in imports(name, path, known):
                if target.split(".")[0] not in ("mesh_ray", "comfy_integration") or target == name:
                    continue
                bad += [f"{path.relative_to(ROOT)}:{line} takes {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported across modules: " + "; ".join(bad)


def test_the_checks_see_a_cycle_an_upward_import_and_a_private_import(tmp_path, monkeypatch):
    """The walls above are checked on a small made-up house, so that none of them passes by reading nothing."""
    pkg = tmp_path / "mesh_ray"
    (pkg / "actors").mkdir(parents=True)
    (pkg / "split").mkdir()
    for f in ("__init__.py", "actors/__init__.py", "split/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "actors" / "stage.py").write_text("from mesh_ray.split.model import SplitModel\n")
    (pkg / "split" / "model.py").write_text("from mesh_ray.actors.stage import _private\nSplitModel = 1\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    for check in (test_mesh_ray_import_graph_has_no_cycle, test_imports_go_down_the_layers,
                  test_no_module_imports_another_modules_private_names):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a house that breaks it")
