"""The package's import graph: no cycles (module-level or lazy) and no imports back up into an
ancestor package's __init__, anywhere in xpr/ (issue 16: em/tie.py <-> em/tie_learned.py was one).

The graph is read from the source with ast, so a lazy import inside a function counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import xpr

PACKAGE_DIR = Path(xpr.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], list[str]]:
    """The xpr modules `name` imports (a `from P import x` counts as P.x when that is a module,
    else as P), and the names it takes from an ancestor package's __init__ ("back up")."""
    is_package = path.name == "__init__.py"
    own_package = name if is_package else name.rpartition(".")[0]
    edges, back_up = set(), []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("xpr"):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    edges.add(submodule)
                elif source in known:
                    edges.add(source)
                    if source != "xpr" and (name + ".").startswith(source + ".") and source != name:
                        back_up.append(f"{name} takes {alias.name!r} from {source}")
    edges.discard(name)
    return edges, back_up


def import_graph():
    known = modules()
    graph, back_up = {}, []
    for name, path in known.items():
        graph[name], found = imported_modules(name, path, known)
        back_up += found
    return graph, back_up


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module imports, ignoring a package's own __init__ importing its children and a
    child importing its package (Python resolves those by loading the package first)."""
    def relevant(a: str, b: str) -> bool:
        return not (b.startswith(a + ".") or a.startswith(b + "."))

    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if not relevant(node, nxt):
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles_in_xpr():
    graph, _ = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_imports_back_up_into_an_ancestor_package():
    _, back_up = import_graph()
    assert back_up == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"xpr.a": {"xpr.b"}, "xpr.b": {"xpr.c"}, "xpr.c": {"xpr.a"}, "xpr.d": {"xpr.a"}}
    assert find_cycle(graph) == ["xpr.a", "xpr.b", "xpr.c", "xpr.a"]
    assert find_cycle({"xpr.a": {"xpr.b"}, "xpr.b": set()}) is None


def test_every_registered_worker_is_named_after_its_command():
    from xpr import registry

    for spec in registry.COMMANDS:
        assert spec.module.rpartition(".")[2] == spec.name, spec
        assert spec.module in modules()
