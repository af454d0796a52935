"""The package's import graph, read statically (ast): no module imports an underscore name from another,
and the modules import each other without a cycle (imports inside functions included, so a cycle cannot
hide in one)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "polytope_lab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, names) for every import of ``path`` inside the package (relative or absolute)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "polytope_lab":
                continue
            names = [a.name for a in node.names if not _is_module(f"{target}.{a.name}")]
            if names:
                yield target, names
            for a in node.names:  # ``from . import patches``: an edge to the submodule only
                if _is_module(f"{target}.{a.name}"):
                    yield f"{target}.{a.name}", []
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "polytope_lab":
                    yield a.name, []


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files
    return {_module_name(f): list(_imports(f)) for f in files}


def test_no_underscore_name_is_imported_across_modules():
    crossing = [f"{module}: from {target} import {name}" for module, imports in _graph().items()
                for target, names in imports for name in names if name.startswith("_") and name != "__version__"]
    assert not crossing, "\n".join(crossing)


def test_the_modules_import_each_other_without_a_cycle():
    """A depth-first search over ``module -> imported module``; a package's ``__init__`` counts as the
    package (importing ``polytope_lab.dual.relu`` runs ``polytope_lab.dual`` first, so that edge is
    implied and not listed)."""
    graph = {m: sorted({t for t, _ in imports if t != m}) for m, imports in _graph().items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
