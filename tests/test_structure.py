"""The import structure: no cycles, and imports go downward only.

Layers, top to bottom: ``main`` (the CLI, compare) -> ``callbacks`` (Lightning callbacks and
the metric library) -> ``lightning_modules`` (methods) -> ``datamodules`` (data, file IO).
Every ``import`` statement counts, also those inside functions (they hide cycles, they do not
remove them).
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("lightning_modules", "datamodules", "callbacks")
#: What each layer may import from the project (besides itself).
ALLOWED = {
    "main": {"callbacks", "lightning_modules", "datamodules"},
    "callbacks": {"lightning_modules", "datamodules"},
    "lightning_modules": {"datamodules"},
    "datamodules": set(),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [REPO / "main.py"] + [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    return {_module_name(p): p for p in files}


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules: Collection[str]) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from package import module` depends on that module; `from module import name`
                # on the module (Python runs a package's __init__ before any of its modules either way).
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in modules else base


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for imported in _imported_names(tree, name, path.name == "__init__.py", modules):
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _layer(module: str) -> str:
    return module.split(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_the_imports_it_must() -> None:
    graph = import_graph()
    assert "lightning_modules.base" in graph["lightning_modules.sml.lightning_model"]
    assert "callbacks.evaluation" in graph["main"]


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_a_cycle_would_be_found() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_go_downward_only(layer: str) -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if _layer(module) == layer
        for target in sorted(targets)
        if _layer(target) != layer and _layer(target) not in ALLOWED[layer]
    ]
    assert wrong == []


def test_no_model_or_data_module_imports_a_callback_module_or_main() -> None:
    wrong = [
        (module, target)
        for module, targets in import_graph().items()
        if _layer(module) in ("lightning_modules", "datamodules")
        for target in targets
        if _layer(target) in ("callbacks", "main")
    ]
    assert wrong == []


def test_method_folders_do_not_import_each_other() -> None:
    """What several methods share lives in shared packages, never in another method's folder."""
    from lightning_modules.registry import discover_methods, methods

    discover_methods()
    folders = {entry.cls.__module__.split(".")[1] for entry in methods().values()}
    crossing = [
        (module, target)
        for module, targets in import_graph().items()
        if module.split(".")[:2][-1] in folders
        for target in targets
        if target.startswith("lightning_modules.") and target.split(".")[1] in folders - {module.split(".")[1]}
    ]
    assert crossing == []
