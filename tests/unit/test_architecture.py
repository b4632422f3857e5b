"""The import graph of the product's packages: no circles, and the layers
docs/architecture.md describes. Every import counts, at module level or inside a function
(a lazy import is still a dependency, and a circle through one is still a circle), and so
do imports only for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("service", "export", "deploy")

#: What a layer may not import (prefixes of module names). Read top-down: transports over
#: the runtime over the data plane over the batcher over the backends.
FORBIDDEN = {
    # The gateway image holds service/ alone: no torch-side export code, no tools, no tests.
    "service": ("export", "deploy", "tests"),
    "export": ("deploy", "tests"),
    "deploy": ("tests",),
    # The data plane knows no transport, no runtime and no shadow (it offers a hook).
    "service.dataplane": (
        "service.api",
        "service.grpc",
        "service.runtime",
        "service.lifecycle",
        "service.shadow",
        "service.app",
        "service.cli",
        "service.server",
    ),
    "service.batching": ("service.dataplane", "service.runtime", "service.api", "service.grpc"),
    "service.backends": (
        "service.dataplane",
        "service.batching",
        "service.runtime",
        "service.api",
        "service.grpc",
    ),
    # Product code starts gateways through service.processes, never through the CLI.
    "service.bench": ("service.cli",),
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``name`` imports (the nearest known parent of each)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            wanted = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for imported in wanted:
            target = imported
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert circles(graph()) == []


def test_the_check_finds_a_circle_and_the_module_names_it_reads():
    """The check itself: a circle is found, whatever its length, and imports read as
    Python resolves them (relative, from-imports of modules, lazy ones)."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges = graph()
    assert "service.scores" in edges["service.shadow"]  # a module-level from-import
    assert "service.processes" in edges["service.bench.tune"]  # a lazy import in a function
    assert "service.backends.base" in edges["service.backends.triton"]


def violations(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in sorted(edges.items())
        for layer, forbidden in FORBIDDEN.items()
        if module == layer or module.startswith(layer + ".")
        for target in sorted(targets)
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]


def test_each_layer_imports_only_what_is_below_it():
    assert violations(graph()) == []
    # The rule bites: the data plane reaching back into the shadows would be reported.
    fake = {"service.dataplane": {"service.shadow"}, "service.shadow": {"service.routing"}}
    assert violations(fake) == ["service.dataplane imports service.shadow"]
