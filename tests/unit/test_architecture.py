"""The import graph of the product's packages: no circles, and the layers
docs/architecture.md describes. Every import counts, at module level or inside a function
(a lazy import is still a dependency, and a circle through one is still a circle), and so
do imports only for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import ROOT

PACKAGES = ("service", "export", "deploy")

#: The gateway's layers, top-down: each folder of ``service/`` may import the folders below
#: it and never one above (docs/architecture.md draws the same stack). ``service.errors`` and
#: ``service.settings`` sit under all of them.
LAYERS = (
    "service.tools",  # the CLI, the load tool, tune, a local Triton: beside the serving path
    "service.transports",  # HTTP and gRPC wire formats, the KServe v2 layer, the servers
    "service.runtime",  # readiness, keys, lifecycle, shadows
    "service.dataplane",  # routing, decoding, preprocessing, batching, scores, statistics
    "service.backends",  # ONNX Runtime, Triton
    "service.observability",  # metrics, request accounts, traces
    "service.model",  # the repository's layout and the preprocessing contract
    "service.host",  # CPUs, memory, processes, the user's files
)

#: What a module or folder may not import (prefixes of module names).
FORBIDDEN = {
    # The gateway image holds service/ alone: no torch-side export code, no tools, no tests.
    "service": ("export", "deploy", "tests"),
    # Export reads and writes the model repository; it serves nothing.
    "export": ("deploy", "tests", "service.transports", "service.runtime"),
    "deploy": ("tests",),
    **{layer: LAYERS[:i] for i, layer in enumerate(LAYERS)},
    "service.errors": LAYERS,
    "service.settings": LAYERS,
    # Inside the data plane the batcher knows nothing of the plane that feeds it, nor its
    # admission and batch policy of the batcher that asks them.
    "service.dataplane.batching": ("service.dataplane.plane", "service.dataplane.routing"),
    **{
        f"service.dataplane.{below}": ("service.dataplane.batching", "service.dataplane.plane")
        for below in ("admission", "batch_policy")
    },
    # Product code starts gateways through service.host.processes, never through the CLI.
    "service.tools.bench": ("service.tools.cli",),
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
    assert (
        "service.dataplane.scores" in edges["service.runtime.shadow"]
    )  # a module-level from-import
    assert "service.host.processes" in edges["service.tools.tune"]  # a lazy import in a function
    assert "service.backends.base" in edges["service.backends.triton.backend"]


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
    fake = {
        "service.dataplane.plane": {"service.runtime.shadow"},
        "service.runtime.shadow": {"service.dataplane.routing"},
    }
    assert violations(fake) == ["service.dataplane.plane imports service.runtime.shadow"]


def test_every_layer_in_the_table_is_a_folder_and_every_folder_is_in_it():
    """The rules name folders that exist (a renamed folder cannot silently escape its rule),
    and every folder of service/ is a layer, or a part of one."""
    known = modules()
    for name in FORBIDDEN:
        assert name in known, f"{name} is in the layer table but not in the source tree"
    folders = {
        ".".join(p.relative_to(ROOT).parts)
        for p in (ROOT / "service").iterdir()
        if (p / "__init__.py").is_file()
    }
    assert folders == set(LAYERS)


#: The fenced block under this heading in docs/architecture.md is the package tree.
TREE_HEADING = "## The package tree"


def documented_tree(markdown: str) -> set[str]:
    """The paths the tree block names: one per line, nested by two spaces, comments after."""
    block = markdown.split(TREE_HEADING, 1)[1].split("```", 2)[1]
    paths: list[str] = []
    stack: list[str] = []
    for line in block.splitlines()[1:]:
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        stack[depth:] = [line.split()[0].rstrip("/")]
        paths.append("/".join(stack))
    return set(paths)


def real_tree() -> set[str]:
    found: set[str] = set()
    for package in ("service", "export"):
        found.add(package)
        for path in (ROOT / package).rglob("*"):
            relative = path.relative_to(ROOT)
            if "__pycache__" in relative.parts or path.name == "__init__.py":
                continue
            if path.is_dir() or path.suffix in (".py", ".proto"):
                found.add(str(relative))
    return found


def test_the_package_tree_in_the_docs_is_the_real_one():
    documented = documented_tree((ROOT / "docs" / "architecture.md").read_text())
    real = real_tree()
    assert not real - documented, (
        f"in the source, not in docs/architecture.md: {sorted(real - documented)}"
    )
    assert not documented - real, (
        f"in docs/architecture.md, not in the source: {sorted(documented - real)}"
    )


def test_the_tree_reader_nests_by_indentation():
    text = (
        f"{TREE_HEADING}\n\n```\nservice/      x\n  a.py        y\n  b/\n    c.py\nexport/\n```\n"
    )
    assert documented_tree(text) == {
        "service",
        "service/a.py",
        "service/b",
        "service/b/c.py",
        "export",
    }


def test_tests_import_helpers_never_another_test_module_or_a_conftest():
    """Shared code is in tests/helpers/ (a package of plain modules); fixtures are in
    conftest.py files, which pytest finds by itself."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                last = name.rpartition(".")[2]
                if name.startswith("tests") and (last.startswith("test_") or last == "conftest"):
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    assert found == []


def test_unit_tests_mirror_the_source():
    """tests/unit/service/<folder>/ tests service/<folder>/: a test is where its module is."""
    stray = [
        str(folder.relative_to(ROOT))
        for folder in (ROOT / "tests" / "unit" / "service").rglob("*")
        if folder.is_dir()
        and folder.name != "__pycache__"
        and not (ROOT / folder.relative_to(ROOT / "tests" / "unit")).is_dir()
    ]
    assert stray == []
