"""moekern's import graph, read from the source: every `import` / `from ... import` of a moekern module, at module
level and inside functions (an import inside a function is a dependency all the same: it only runs later). The
graph must have no cycle, so that each module knows only the layers under it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The command-line modules, checked on their own: commands import runners, runners never import commands.
COMMANDS = ("moekern.cli", "moekern.bench", "moekern.cli.finetune")


def module_names(package: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(package: Path) -> dict[tuple[str, str], str]:
    """{(importer, imported): "module" | "function"} for the imports between the modules of `package`: "module" where
    one import of the pair runs at import time, "function" where all of them are inside functions."""
    modules = module_names(package)

    def known(name: str) -> str | None:  # the module a dotted name lies in (a name imported from a module: the module)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"

        def targets(node) -> list[str]:
            if isinstance(node, ast.Import):
                return [alias.name for alias in node.names]
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1
                parts = importer.split(".") if is_package else importer.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]

        def visit(node, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for name in targets(child):
                        imported = known(name)
                        if imported is not None and imported != importer:
                            kind = "function" if in_function else "module"
                            if edges.get((importer, imported)) != "module":
                                edges[(importer, imported)] = kind
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(), str(path)), False)
    return edges


def cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def describe(component: list[str], edges) -> str:
    inside = sorted((a, b, kind) for (a, b), kind in edges.items() if a in component and b in component)
    lines = [f"  {a} -> {b}" + ("  (inside a function)" if kind == "function" else "") for a, b, kind in inside]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(lines)


def is_command(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in COMMANDS)


EDGES = import_graph(ROOT / "moekern")


def test_the_graph_sees_moekerns_imports():
    assert EDGES[("moekern.surgery", "moekern.models")] == "module"
    assert EDGES[("moekern.checkpoint", "moekern.quantized_folders")] == "function"


def test_a_cycle_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("import pkg.a as a\n")
    (package / "d.py").write_text("from pkg import a\n")
    edges = import_graph(package)
    assert edges[("pkg.sub.b", "pkg.c")] == "function"
    assert cycles(edges) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert cycles({k: v for k, v in edges.items() if v == "module"}) == []


def test_no_cycle_at_import_time():
    module_level = {pair: kind for pair, kind in EDGES.items() if kind == "module"}
    found = cycles(module_level)
    assert not found, "\n".join(describe(c, module_level) for c in found)


def test_no_cycle_in_the_library():
    found = [c for c in cycles(EDGES) if not any(is_command(m) for m in c)]
    assert not found, "\n".join(describe(c, EDGES) for c in found)


def package_of(module: str) -> str:
    """moekern.compression.trimming.stats -> moekern.compression; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def test_a_package_cycle_is_found():
    edges = {("pkg.a.x", "pkg.b.y"): "function", ("pkg.b.z", "pkg.a.w"): "module", ("pkg.a.x", "pkg.a.w"): "module"}
    packages = {(package_of(a), package_of(b)): kind for (a, b), kind in edges.items()
                if package_of(a) != package_of(b)}
    assert cycles(packages) == [["pkg.a", "pkg.b"]]


def test_no_cycle_among_packages():
    """Each subpackage (and top-level module) as one node: a layer imports only the layers under it, so no two
    packages import each other even through different modules."""
    packages = {}
    for (a, b), kind in EDGES.items():
        if package_of(a) != package_of(b):
            packages.setdefault((package_of(a), package_of(b)), []).append(f"{a} -> {b}")
    found = cycles(packages)
    assert not found, "\n".join(f"cycle among {', '.join(c)}: " + "; ".join(
        edge for (a, b), edges in sorted(packages.items()) if a in c and b in c for edge in edges) for c in found)


def test_no_cycle_in_the_commands():
    found = [c for c in cycles(EDGES) if any(is_command(m) for m in c)]
    assert not found, "\n".join(describe(c, EDGES) for c in found)
