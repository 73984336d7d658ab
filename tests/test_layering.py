"""The package's shape, checked from its source with `ast` (imports inside functions count too).

- no cycle between edgeexit's sub-packages (edgeexit.X, top-level modules included), and none
  between its modules (lazy imports included: a lazy import only hides a cycle);
- `edgeexit.runtime` (what a camera app embeds) imports no job: train, export, calibrate, data,
  bench, quickstart, cli — only `errors`, `util` and, lazily for the torch backend, `models`;
- no function in edgeexit/ is longer than MAX_FUNCTION_LINES.

Run `python tests/test_layering.py` to print the graph.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgeexit"
RUNTIME_MAY_IMPORT = {"errors", "util", "models"}
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every edgeexit module this file imports (absolute or relative, at any depth)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "edgeexit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "edgeexit":
                found.add(mod)
    return found


def _unit(module: str) -> str:
    """edgeexit.runtime.backends.tensorrt -> runtime; edgeexit.cli -> cli; edgeexit -> edgeexit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def subpackage_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        src = _unit(_module_name(path))
        edges.setdefault(src, set())
        for mod in _imports(path):
            dst = _unit(mod)
            if dst != src and dst != "edgeexit":
                edges[src].add(dst)
    return dict(edges)


def module_graph() -> dict[str, set[str]]:
    """Module -> the edgeexit modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("edgeexit"):
                found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        found |= {resolve(m) for m in _imports(path)}
        edges[name] = {m for m in found if m and m != name and not name.startswith(m + ".")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str]]:
    rows = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    rows.append((n, f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def test_no_cycle_between_subpackages():
    edges = subpackage_graph()
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_no_cycle_between_modules():
    edges = module_graph()
    assert "edgeexit.train.torch_device" in edges["edgeexit.train.evaluation"]  # the graph sees lazy imports
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_the_runtime_imports_no_job():
    edges = subpackage_graph()
    assert edges["runtime"] <= RUNTIME_MAY_IMPORT, f"runtime imports {sorted(edges['runtime'] - RUNTIME_MAY_IMPORT)}"


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_the_import_scanner_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    f = PACKAGE / "runtime" / "cascade.py"
    assert any(m.startswith("edgeexit.runtime") for m in _imports(f))
    # a probe module in a copy of the package's layout (the source tree is never written)
    fake = tmp_path / "edgeexit"
    (fake / "runtime" / "backends").mkdir(parents=True)
    probe = fake / "runtime" / "backends" / "_probe_for_test.py"
    probe.write_text("def f():\n    from ...calibrate import run\n    import edgeexit.train.trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _imports(probe) == {"edgeexit.calibrate", "edgeexit.train.trainer"}


def test_no_long_functions():
    assert long_functions() == []


if __name__ == "__main__":
    graph = subpackage_graph()
    for src in sorted(graph):
        print(f"{src:11s} -> {', '.join(sorted(graph[src])) or '(nothing)'}")
    cycle = find_cycle(graph)
    print("cycle:", " -> ".join(cycle) if cycle else "none")
    modules = module_graph()
    print("module cycle:", " -> ".join(find_cycle(modules) or ["none"]))
    print("functions over", MAX_FUNCTION_LINES, "lines:", long_functions() or "none")
