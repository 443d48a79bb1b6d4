"""The import graph of the package follows the layer order of ``docs/design.md``: no module
imports one above its layer except the two documented, deprecated paths, and without those
there is no import cycle. Imports only made for type checking do not count."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "droptune"

#: Bottom to top; a module belongs to the longest name that prefixes it. Kept in step with the
#: table "Layers" in docs/design.md.
LAYERS: list[tuple[str, ...]] = [
    (
        "droptune.exceptions",
        "droptune.kinds",
        "droptune.records",
        "droptune._lazy",
        "droptune._validation",
        "droptune.timing",
        "droptune.processes",
    ),
    ("droptune.config", "droptune._sections"),
    ("droptune.layers",),
    ("droptune.data",),
    ("droptune.models",),
    ("droptune.population", "droptune.training"),
    ("droptune.storage",),
    (
        "droptune.tracking._client",
        "droptune.tracking._writer",
        "droptune.tracking._server",
        "droptune.tracking._live",
    ),
    (
        "droptune.study.spec",
        "droptune.study.space",
        "droptune.study.sampling",
        "droptune.study.slots",
        "droptune.study.factories",
    ),
    ("droptune.study.outcome",),
    ("droptune.study.objective", "droptune.study.confirm", "droptune.study.population"),
    ("droptune.export",),
    ("droptune.tracking",),
    ("droptune.study",),
    ("droptune.stack",),
    ("droptune.cli", "droptune"),
]

#: The only imports up the layers: ``TrainConfig.build_*`` (deprecated shims, one release) and
#: ``droptune.config.load_config`` of an MLflow artifact URI.
ALLOWED_UP = {("droptune.config", "droptune.training"), ("droptune.config", "droptune.export")}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (
            (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        ):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def import_graph() -> dict[str, set[str]]:
    """``{module: droptune modules it imports at run time}`` (function-level imports too)."""
    modules = _modules()

    def resolve(target: str) -> str | None:
        parts = target.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in modules:
                return ".".join(parts[:k])
        return None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith("droptune"):
                    continue
                found = resolve(target)
                # a package importing its own submodules, or a module its own package
                if found and found != name and not name.startswith(found + "."):
                    graph[name].add(found)
    return graph


def layer(module: str) -> int:
    best: tuple[int, int] | None = None
    for index, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (index, len(prefix))
    if best is None:
        pytest.fail(f"{module} is in no layer: add it to LAYERS and docs/design.md")
    return best[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_follow_the_layers_and_form_no_cycle() -> None:
    graph = import_graph()
    up = {(a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a)}
    assert up <= ALLOWED_UP, f"imports up the layers: {sorted(up - ALLOWED_UP)}"
    assert len(up) <= 2
    rest = {a: {b for b in targets if (a, b) not in ALLOWED_UP} for a, targets in graph.items()}
    assert _cycle(rest) is None, f"import cycle: {' -> '.join(_cycle(rest) or [])}"


def test_the_checks_see_an_upward_import_and_a_cycle() -> None:
    """The two checks above can fail: a made-up import from the bottom layer to the top is
    upward, and it closes a cycle."""
    graph = import_graph()
    assert layer("droptune.cli") > layer("droptune.records")
    graph["droptune.records"] = {"droptune.cli"}
    assert _cycle(graph) is not None
    assert graph["droptune.cli"]  # the CLI imports something that reaches the records


def test_no_module_is_over_the_size_limit() -> None:
    """One concept per module: none over 600 lines."""
    over = {
        str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
        if len(path.read_text().splitlines()) > 600
    }
    assert not over, over
