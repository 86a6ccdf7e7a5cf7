"""The package's layout rule (docs/development.md), read from the source with `ast`: nothing is imported or run.

The library's layers (data -> trainer -> merging -> pipelines -> evaluation) take what they are given; the embedded
microworld plugs in from above (safety_dpo.worlds), so none of them imports it. No two modules import each other,
directly or through others. Lazy imports inside functions count: they are dependencies all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "safety_dpo"
LOWER_LAYERS = ("data", "trainer", "merging", "pipelines", "evaluation")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports (`import a.b`, `from a import b`, relative imports), as the
    longest module name each import names: `from safety_dpo.data import writers` is `safety_dpo.data.writers`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): imported_modules(path, modules) for path in paths}
    # `import safety_dpo.data.writers` runs safety_dpo/__init__ and safety_dpo/data/__init__ too, but a package's
    # __init__ re-exporting its submodules is not a circle of its own: only module -> module edges count, and a
    # module's edge to the package that contains it is dropped.
    return {
        module: {target for target in targets if not module.startswith(f"{target}.")}
        for module, targets in graph.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_lower_layers_never_import_the_microworld():
    offenders = {
        module: sorted(target for target in targets if target.startswith("safety_dpo.microworld"))
        for module, targets in import_graph().items()
        if module.split(".")[1:2] and module.split(".")[1] in LOWER_LAYERS
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}


def test_the_layers_import_only_downwards_and_never_the_top():
    order = list(LOWER_LAYERS)  # the data flow: data -> trainer -> merging -> pipelines -> evaluation
    upward = []
    for module, targets in import_graph().items():
        layer = module.split(".")[1] if module.count(".") else None
        if layer not in order:
            continue
        for target in targets:
            other = target.split(".")[1] if target.count(".") else None
            if other in ("align", "cli") or (other in order and order.index(other) > order.index(layer)):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_module_imports_another_that_imports_it_back():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from safety_dpo.microworld import load_pipeline", {"safety_dpo.microworld"}),
        ("import safety_dpo.microworld.judge", {"safety_dpo.microworld.judge"}),
        ("def f():\n    from ..microworld.judge import Judge", {"safety_dpo.microworld.judge"}),
        ("from . import llm_writers", {"safety_dpo.data.llm_writers"}),
    ],
)
def test_the_checker_sees_lazy_relative_and_dotted_imports(tmp_path, monkeypatch, source, expected):
    modules = {"safety_dpo.microworld", "safety_dpo.microworld.judge", "safety_dpo.data.llm_writers"}
    path = PACKAGE / "data" / "_layout_probe.py"  # named as a module of the package, read from tmp_path
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert imported_modules(path, modules) == expected


def test_the_checker_finds_a_circle():
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]
