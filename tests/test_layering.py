"""The import graph of ``lifeboat``, read from the source with ``ast`` (imports at module level and
inside functions alike): no two modules import each other, and packages depend downwards only,
as ``shared/DESIGN.md`` ("Packages") says::

    orchestrator -> targets / nbdserver / exporters / agent / filerestore -> archive -> plumbing

Nothing imports ``orchestrator`` (but ``lifeboat``'s own ``__main__``); ``plumbing`` imports nothing
else of lifeboat. Each failure names the offending import (file and line)."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "lifeboat"

# a package may import packages of a lower rank (and its own modules), never one of the same or a
# higher rank; the lifeboat package itself (its __init__ and __main__) sits above all
RANK = {"plumbing": 0, "archive": 1, "agent": 2, "exporters": 2, "filerestore": 2, "nbdserver": 2, "targets": 2,
        "orchestrator": 3}


@dataclass(frozen=True)
class Edge:
    """One import statement: module ``src`` imports module ``dst`` at ``where``."""

    src: str
    dst: str
    where: str


def modules() -> dict[str, Path]:
    """Every module of the ``lifeboat`` package (through its folder links), by dotted name."""
    out: dict[str, Path] = {}
    files = [Path(d) / f for d, _, names in os.walk(ROOT, followlinks=True) for f in names if f.endswith(".py")]
    for path in sorted(files):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    """The lifeboat modules ``name`` imports (``from P import x`` counts as P.x when that is a
    module, else as P)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        where = f"{path.relative_to(ROOT.parent)}:{getattr(node, 'lineno', 0)}"
        for t in targets:
            while t and t not in known:  # import lifeboat.x.y of a module: the module itself
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("lifeboat"):
                edges.append(Edge(name, t, where))
    return edges


def graph() -> list[Edge]:
    """Every import between lifeboat's modules."""
    known = modules()
    return [e for name, path in known.items() for e in imports(name, path, known)]


def package_of(module: str) -> str:
    """``lifeboat.targets.qemu`` -> ``targets``; the ``lifeboat`` package itself -> ``lifeboat``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "lifeboat"


def test_the_graph_is_read() -> None:
    edges = graph()
    assert any(e.src == "lifeboat.orchestrator.engine" and e.dst == "lifeboat.orchestrator.steps" for e in edges)
    assert set(RANK) <= {package_of(m) for m in modules()}


def test_no_two_modules_import_each_other() -> None:
    edges = graph()
    pairs = {(e.src, e.dst): e for e in edges}
    loops = sorted(
        f"{e.src} <-> {e.dst}: {e.where} and {pairs[(e.dst, e.src)].where}"
        for e in edges
        if (e.dst, e.src) in pairs and e.src < e.dst
    )
    assert loops == [], "modules that import each other:\n" + "\n".join(loops)


def test_packages_depend_downwards_only() -> None:
    wrong = []
    for e in graph():
        src, dst = package_of(e.src), package_of(e.dst)
        if src == dst or src == "lifeboat":
            continue
        if dst == "lifeboat" or RANK[dst] >= RANK[src]:
            wrong.append(f"{e.where}: {e.src} imports {e.dst} ({src} must not depend on {dst})")
    assert wrong == [], "imports against the package order:\n" + "\n".join(sorted(wrong))


def test_nothing_imports_the_orchestrator_and_plumbing_imports_nothing() -> None:
    edges = graph()
    into_orchestrator = [
        f"{e.where}: {e.src}"
        for e in edges
        if package_of(e.dst) == "orchestrator" and package_of(e.src) not in ("orchestrator", "lifeboat")
    ]
    assert into_orchestrator == [], "imports of the orchestrator:\n" + "\n".join(into_orchestrator)
    out_of_plumbing = [
        f"{e.where}: {e.src} imports {e.dst}"
        for e in edges
        if package_of(e.src) == "plumbing" and package_of(e.dst) != "plumbing"
    ]
    assert out_of_plumbing == [], "plumbing imports the rest of lifeboat:\n" + "\n".join(out_of_plumbing)
