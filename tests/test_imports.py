"""No import circles in hpcgan/ (issue 21): every import counts, at module level or inside a function, at any
depth of the cycle; a module importing its own package's __init__ (or an ancestor's) is not an edge."""
from __future__ import annotations

import ast
from pathlib import Path

from hpcgan import REPO_ROOT


def module_graph(root: Path, top: str = "hpcgan") -> dict[str, set[str]]:
    """{module: the project modules it imports}, from the source (nothing is imported)."""
    mods = {}
    for p in (root / top).rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def resolve(name: str) -> str | None:   # "hpcgan.data.shards.SPLITS" -> "hpcgan.data.shards"
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r and r != m and not m.startswith(r + "."):
                    edges[m].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walker_finds_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "hpcgan"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from hpcgan.sub import a\n")    # its own package: no edge
    (pkg / "sub" / "a.py").write_text("from hpcgan.sub.b import X\n")
    (pkg / "sub" / "b.py").write_text("X = 1\n")
    (pkg / "c.py").write_text("from .sub import a\n")
    assert cycles(module_graph(tmp_path)) == []
    (pkg / "sub" / "b.py").write_text("X = 1\ndef f():\n    from ..c import a\n")   # b -> c -> sub (its __init__) -> a -> b
    assert cycles(module_graph(tmp_path)) == [["hpcgan.c", "hpcgan.sub", "hpcgan.sub.a", "hpcgan.sub.b"]]


def test_no_import_circle_in_the_package():
    edges = module_graph(REPO_ROOT)
    assert len(edges) > 50 and "hpcgan.data.shards" in edges["hpcgan.train"]
    assert cycles(edges) == []


SWEEP_LAYERS = ("settings", "compose", "expand", "queue", "tasks", "run", "slurm", "status", "launch")


def test_the_sweep_package_is_a_module_per_job_each_importing_only_those_above_it():
    """hpcgan/sweep/ (issue 21): no module over 400 lines, and the layers of its docstring hold."""
    root = REPO_ROOT / "hpcgan" / "sweep"
    assert sorted(p.stem for p in root.glob("*.py")) == sorted(("__init__", *SWEEP_LAYERS))
    assert all(len(p.read_text().splitlines()) <= 400 for p in root.glob("*.py"))
    edges = module_graph(REPO_ROOT)
    for i, layer in enumerate(SWEEP_LAYERS):
        inside = {e.rpartition(".")[2] for e in edges[f"hpcgan.sweep.{layer}"] if e.startswith("hpcgan.sweep.")}
        assert inside <= set(SWEEP_LAYERS[:i]), (layer, inside)
