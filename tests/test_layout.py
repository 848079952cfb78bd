"""The package's layering: no import cycles (lazy imports inside functions count), the
building blocks in ``ops`` import nothing of the package, and nothing imports a private
name from another module."""

from __future__ import annotations

import ast
from pathlib import Path

import synthmorph_nipype

ROOT = Path(synthmorph_nipype.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) of every import in a file, relative ones resolved."""
    here = _module(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, names in _imports(path):
            for t in [f"{target}.{n}" for n in names] + [target]:
                if t in modules and t != name:
                    edges.add(t)
                    break
        graph[name] = edges
    return graph


def test_no_import_cycles():
    graph = _graph()
    # packages' __init__ re-export their modules: an edge into a package is fine as long
    # as the package does not import back; plain depth-first search over all edges
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_ops_import_nothing_of_the_package():
    for path in (ROOT / "ops").glob("*.py"):
        ours = {t for t, _ in _imports(path)
                if t.startswith("synthmorph_nipype") and not t.startswith(
                    "synthmorph_nipype.ops")}
        assert not ours, f"{path.name} imports {sorted(ours)}"


def test_no_private_names_across_modules():
    found = []
    for path in ROOT.rglob("*.py"):
        for target, names in _imports(path):
            if target.startswith("synthmorph_nipype"):
                found += [f"{_module(path)} imports {target}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert not found, "; ".join(found)
