"""The layering rules, read statically from the source (ast), not by starting interpreters.

* no underscore name is imported across modules (``from .x import _name``);
* the import graph of ``polytope_lab`` and ``experiments`` has no cycle, imports inside functions included;
* no library file over ``MAX_FILE_LINES`` and no function over ``MAX_FUNCTION_LINES`` (docstring not
  counted) without a reason written next to it (a comment containing ``long:`` just above the ``def``, or
  in a file's first lines for the file);
* the library never prints.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("polytope_lab", "experiments")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict:
    """{module name: (path, ast tree)} for every file of the packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(modules: dict):
    """Yield (importer, imported module, imported name or None, line) for every import of our modules."""
    for name, (path, tree) in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield name, alias.name, None, node.lineno
            elif isinstance(node, ast.ImportFrom):
                target = resolve(name, path, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # ``from . import x`` of a submodule
                        yield name, sub, None, node.lineno
                    else:
                        yield name, target, alias.name, node.lineno


def graph(modules: dict) -> dict:
    edges = {name: set() for name in modules}
    for importer, target, _, _ in imports(modules):
        if target in modules and target != importer:
            edges[importer].add(target)
    return edges


def find_cycle(edges: dict):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


MODULES = sources()


def test_no_private_names_imported_across_modules():
    bad = [f"{importer}:{line} imports {name} from {target}"
           for importer, target, name, line in imports(MODULES)
           if name and name.startswith("_") and not name.startswith("__") and target.split(".")[0] in PACKAGES]
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycle():
    assert find_cycle(graph(MODULES)) is None, f"import cycle: {' -> '.join(find_cycle(graph(MODULES)))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_private_import_detector_sees_relative_imports(tmp_path):
    tree = ast.parse("from .dual import _columns\n")
    node = tree.body[0]
    assert resolve("polytope_lab.chunked", ROOT / "polytope_lab" / "chunked.py", node) == "polytope_lab.dual"


def long_functions(tree: ast.AST, lines: list) -> list:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - start + 1
            doc = node.body[0]
            if isinstance(doc, ast.Expr) and isinstance(getattr(doc, "value", None), ast.Constant) \
                    and isinstance(doc.value.value, str):
                length -= doc.end_lineno - doc.lineno + 1  # the docstring does not count
            context = " ".join(lines[max(0, start - 3):node.lineno])
            if length > MAX_FUNCTION_LINES and "long:" not in context:
                out.append(f"{node.name} ({length} lines, line {node.lineno})")
    return out


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("polytope_lab")))
def test_library_files_and_functions_are_small(module):
    path, tree = MODULES[module]
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_FILE_LINES or "long:" in " ".join(lines[:5]), f"{path.name}: {len(lines)} lines"
    assert not long_functions(tree, lines), f"{path.name}: {long_functions(tree, lines)}"


def test_library_never_prints():
    calls = [f"{m}:{node.lineno}" for m, (_, tree) in MODULES.items() if m.startswith("polytope_lab")
             for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not calls, calls


def test_public_surface_is_small_and_registers_every_backend():
    import polytope_lab as pl
    assert 15 <= len(pl.__all__) <= 24, pl.__all__   # issue 12: about 20; issue 15 adds Box, load_onnx, read_vnnlib, verify_property
    assert all(hasattr(pl, name) for name in pl.__all__)
    assert {"interval", "dual", "lp", "milp"} <= set(pl.Bounder.available())
