"""The package's import graph has no cycles (issue 12 item 1).

Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`. A
cycle hidden in a function or a type-checking block still means two modules that cannot
be read, or changed, one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "devmgr"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """Return the module of the package that `name` (a module or a name in one) is."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Map each module of the package to the package modules it imports, anywhere."""
    files = {_module_name(p, package.parent): p for p in package.rglob("*.py")}
    # the Cython extensions (devmgr._core...) are modules too, with no imports of ours
    stubs = {_module_name(p, package.parent) for p in package.rglob("*.pyi")}
    modules = set(files) | stubs
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                # `from devmgr import _child` imports a module; `from devmgr import X` a name
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                dep = _resolve(target, modules)
                if dep is not None and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    described = [
        "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in cycles
    ]
    assert not cycles, "import cycles: " + " | ".join(described)


def test_cycle_check_sees_hidden_imports(tmp_path: Path) -> None:
    """A cycle through a function-level and a TYPE_CHECKING import is found."""
    pkg = tmp_path / "devmgr"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_a.py").write_text("def f():\n    from devmgr._b import g\n    return g\n")
    (pkg / "_b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from devmgr import _a\n"
    )
    (pkg / "_c.py").write_text("from . import _a\nfrom devmgr import _ext\n")
    (pkg / "_ext.pyi").write_text("def proxy() -> None: ...\n")
    graph = import_graph(pkg)
    assert graph["devmgr._c"] == {"devmgr._a", "devmgr._ext"}
    assert find_cycles(graph) == [["devmgr._a", "devmgr._b"]]


def test_package_names_count_as_imports_of_the_package(tmp_path: Path) -> None:
    pkg = tmp_path / "devmgr"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from devmgr._a import A\n")
    (pkg / "_a.py").write_text("class A:\n    def m(self):\n        from devmgr import A\n")
    assert find_cycles(import_graph(pkg)) == [["devmgr", "devmgr._a"]]


def test_the_readme_layout_drawing_is_the_import_graph() -> None:
    graph = import_graph()
    layer_of: dict[str, int] = {}
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```text\n_wire ")
    drawing = text[start + len("```text\n") : text.index("```", start + 8)]
    for number, line in enumerate(drawing.splitlines()):
        for word in line.split():
            if word.startswith("_") and word.isidentifier():
                layer_of[f"devmgr.{word}"] = number
            else:
                break  # the rest of the line says what the layer is
    extensions = {f"devmgr.{stub.stem}" for stub in PACKAGE.glob("*.pyi")}  # core/*.pyx
    modules = set(graph) - {"devmgr"} | extensions
    assert set(layer_of) == modules, (
        f"drawn, no such module: {sorted(set(layer_of) - modules)}; "
        f"not drawn: {sorted(modules - set(layer_of))}"
    )
    upward = [
        f"{module} -> {dep}"
        for module, deps in sorted(graph.items())
        for dep in sorted(deps)
        if module in layer_of and dep in layer_of and layer_of[dep] > layer_of[module]
    ]
    assert not upward, f"imports of a lower layer: {upward}"
