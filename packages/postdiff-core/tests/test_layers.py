"""The engine's layers: its import graph, read from the source, has no cycle and no import that runs up the layers.

Every ``import`` counts wherever it stands (module level, inside a function, under ``try``, under ``if
TYPE_CHECKING:``), because an import inside a function is still a dependency (it only runs later), and an
annotation-only one is one a reader follows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "src" / "postdiff"

# bottom to top; a module may import modules of its own layer and of the layers below it
LAYERS = ("foundation", "plan", "loop", "pytorch", "families", "bundle")
FOUNDATION = ("errors", "files", "validate", "profiling")


def layer_of(module: str) -> str | None:
    """The layer of ``postdiff.x.y`` (None for the package facade ``postdiff`` itself)."""
    parts = module.split(".")
    if parts[0] != "postdiff" or len(parts) == 1:
        return None
    return "foundation" if parts[1] in FOUNDATION else parts[1]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported engine module, line) for every import of an engine module in ``path``, wherever it stands."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = {module_name(p, root) for p in root.rglob("*.py")}
    out: list[tuple[str, int]] = []

    def add(target: str, node: ast.AST) -> None:
        if target.split(".")[0] == "postdiff" and target != name:
            out.append((target, node.lineno))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                for alias in child.names:  # `from postdiff.loop import arrays` imports the module postdiff.loop.arrays
                    submodule = f"{source}.{alias.name}"
                    add(submodule if submodule in known else source, child)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


def import_graph(root: Path = ENGINE) -> dict[str, list[tuple[str, int]]]:
    return {module_name(p, root): imports_of(p, root) for p in sorted(root.rglob("*.py"))}


def upward_imports(graph) -> list[str]:
    """Imports that run up the layer order, or into an unknown layer, as readable lines."""
    bad = []
    for module, edges in graph.items():
        here = layer_of(module)
        if here is None:
            continue  # the facade (``postdiff/__init__.py``) re-exports names from every layer, lazily
        for target, line in edges:
            there = layer_of(target)
            if there is None:
                bad.append(f"{module}:{line} imports the package facade postdiff; import the module that defines the name")
            elif here not in LAYERS or there not in LAYERS:
                bad.append(f"{module}:{line} -> {target}: {here if here not in LAYERS else there} is not a layer {LAYERS}")
            elif LAYERS.index(there) > LAYERS.index(here):
                bad.append(f"{module}:{line} imports {target}: {here} may not import {there} (layers: {' < '.join(LAYERS)})")
    return bad


def import_cycles(graph) -> list[list[str]]:
    """Every cycle (strongly connected set of modules, or a module that imports itself), typing-only imports included."""
    edges = {m: sorted({t for t, _ in e if t in graph}) for m, e in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
            if len(component) > 1 or v in edges[v]:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    return cycles


def test_the_engine_has_no_import_cycle_and_no_upward_import():
    graph = import_graph()
    assert len(graph) > 25 and all(layer_of(m) in (*LAYERS, None) for m in graph), sorted(graph)
    assert import_cycles(graph) == []
    assert upward_imports(graph) == []


def lazy_imports_without_a_reason(root: Path = ENGINE) -> list[str]:
    """Imports of engine modules inside a function that carry no ``# lazy: <reason>`` comment on their line."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "__init__.py":
            continue  # the facade resolves its names lazily by design (PEP 562)
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else [inner.module or ""]
                        engine = inner.level > 0 if isinstance(inner, ast.ImportFrom) else False
                        engine = engine or any(n.split(".")[0] == "postdiff" for n in names)
                        if engine and "# lazy:" not in lines[inner.end_lineno - 1]:
                            bad.append(f"{path.relative_to(root.parent)}:{inner.lineno}")
    return bad


def test_imports_inside_functions_say_why_they_are_lazy():
    assert lazy_imports_without_a_reason() == []


def test_every_layer_is_a_subpackage_with_modules():
    for layer in LAYERS[1:]:
        assert (ENGINE / layer / "__init__.py").is_file(), layer
        assert len(list((ENGINE / layer).glob("*.py"))) > 2, layer
    assert sorted(p.stem for p in ENGINE.glob("*.py")) == sorted(("__init__", *FOUNDATION))


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "postdiff" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "postdiff"


@pytest.mark.parametrize(
    ("files", "cycle", "upward"),
    [
        # an import inside a function that closes a circle: a cycle, though it would import fine
        (
            {"loop/a.py": "import postdiff.loop.b\n", "loop/b.py": "def f():\n    from postdiff.loop import a\n"},
            [["postdiff.loop.a", "postdiff.loop.b"]],
            0,
        ),
        # a relative import that runs up from the plan layer to the loop layer
        ({"plan/a.py": "def f():\n    from ..loop.b import x\n", "loop/b.py": "x = 1\n"}, [], 1),
        # an annotation-only import closes a circle too, and may not run up the layers
        (
            {
                "loop/a.py": "import postdiff.loop.b\n",
                "loop/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from postdiff.loop import a\n",
            },
            [["postdiff.loop.a", "postdiff.loop.b"]],
            0,
        ),
        (
            {
                "plan/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from postdiff.bundle.b import x\n",
                "bundle/b.py": "x = 1\n",
            },
            [],
            1,
        ),
        # downward, at any depth: fine
        ({"bundle/a.py": "def f():\n    import postdiff.plan.b\n", "plan/b.py": "from postdiff import errors\n", "errors.py": ""}, [], 0),
        # a foundation module importing a layer
        ({"errors.py": "from postdiff.plan import b\n", "plan/b.py": "x = 1\n"}, [], 1),
    ],
)
def test_the_check_fails_on_a_cycle_or_an_upward_import(tmp_path, files, cycle, upward):
    graph = import_graph(_write(tmp_path, files))
    assert import_cycles(graph) == cycle
    assert len(upward_imports(graph)) == upward, upward_imports(graph)


def test_a_lazy_import_without_its_reason_is_reported(tmp_path):
    root = _write(
        tmp_path,
        {
            "loop/a.py": "def f():\n    from postdiff.loop import b  # lazy: b is heavy\n\n\ndef g():\n    import postdiff.loop.b\n",
            "loop/b.py": "def h():\n    import json\n",
        },
    )
    assert lazy_imports_without_a_reason(root) == ["postdiff/loop/a.py:6"]
