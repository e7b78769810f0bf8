"""The architecture, checked: every import of `src/dnis` points down the layers, and none goes
round in a circle.

The layers, lowest first (a module may import its own layer and the ones below):

    dnis (the package root), dnis.errors, dnis.io, dnis.distributed, dnis.registry, dnis.plugins
    -> dnis.data -> dnis.embeddings -> dnis.models -> dnis.tasks
    -> dnis.train (trainer, progress, checkpoints) -> dnis.search (the methods)
    -> dnis.export
    -> dnis.app (the config, the train/search/compare/evaluate commands, tracking, reports)
    -> dnis.cli, dnis.__main__

Every import counts, wherever it is written: at the top of a module, inside a function (a lazy
import), under `if TYPE_CHECKING:` or in a try block. Imports are read with `ast`, so nothing is
imported to check them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, ...]] = [
    ("dnis", "dnis.errors", "dnis.io", "dnis.distributed", "dnis.registry", "dnis.plugins"),
    ("dnis.data",),
    ("dnis.embeddings",),
    ("dnis.models",),
    ("dnis.tasks",),
    ("dnis.train",),
    ("dnis.search",),
    ("dnis.export",),
    ("dnis.app",),
    ("dnis.cli", "dnis.__main__"),
]
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module of dnis
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(SRC.parent)}:{self.line}"


def module_names() -> dict[str, Path]:
    """{dotted module name: file} of every module of the dnis package."""
    names = {}
    for path in sorted((SRC / "dnis").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports(modules: dict[str, Path]) -> Iterator[Import]:
    """Every import of a dnis module by a dnis module, resolved to the module imported.

    `from dnis.x import y` imports module `dnis.x.y` when there is one, else a name of `dnis.x`;
    a relative import is resolved against the importing module's package."""
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                    for alias in node.names
                ]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets = [node.args[0].value]
            resolved = set()
            for target in targets:
                if target == "dnis" or target.startswith("dnis."):
                    while target not in modules:  # `import dnis.x.y` of a name, not a module
                        target = target.rpartition(".")[0]
                    resolved.add(target)
            for target in sorted(resolved):
                yield Import(name, target, path, node.lineno)


def unit(module: str) -> str:
    """The top-level part of dnis a module belongs to: `dnis.search.pep` -> `dnis.search`."""
    return ".".join(module.split(".")[:2])


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (each holds a cycle)."""
    reach: dict[str, set[str]] = {}
    for start in edges:
        seen: set[str] = set()
        todo = list(edges[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))
        reach[start] = seen
    found: list[set[str]] = []
    for node in sorted(edges):
        if node in reach[node] and not any(node in c for c in found):
            found.append({other for other in reach[node] if node in reach.get(other, ())})
    return found


def cycle_path(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through a component, for the error message: a -> b -> ... -> a."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(edges[node] & component):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    raise AssertionError(f"no cycle through {start}")


MODULES = module_names()
IMPORTS = list(imports(MODULES))


def test_the_checker_sees_the_imports_it_must() -> None:
    found = {(i.source, i.target) for i in IMPORTS}
    assert ("dnis.cli", "dnis.app.config") in found  # a top-level import
    assert ("dnis.search", "dnis.search.pep") in found  # `from dnis.search import pep`
    assert ("dnis.export.artifact", "dnis.export.torchscript") in found  # `from dnis.export import`
    assert any(i.source == "dnis.app.track.base" and i.path.name == "base.py" for i in IMPORTS)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_every_part_of_dnis_has_a_layer() -> None:
    unplaced = sorted({unit(m) for m in MODULES} - set(LAYER))
    assert not unplaced, f"place these in LAYERS of {__file__}: {unplaced}"


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{i.where()}: {i.source} imports {i.target}, a higher layer "
        f"({unit(i.source)} is layer {LAYER[unit(i.source)]}, {unit(i.target)} layer "
        f"{LAYER[unit(i.target)]})"
        for i in IMPORTS
        if LAYER[unit(i.target)] > LAYER[unit(i.source)]
    ]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {unit(m): set() for m in MODULES}
    for i in IMPORTS:
        if unit(i.source) != unit(i.target):
            edges[unit(i.source)].add(unit(i.target))
    found = [f"{' -> '.join(cycle_path(c, edges))} (in all: {sorted(c)})" for c in cycles(edges)]
    assert not found, "packages that import each other:\n" + "\n".join(found)


def test_no_cycle_between_modules() -> None:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        if i.source != i.target:
            edges[i.source].add(i.target)
    found = [f"{' -> '.join(cycle_path(c, edges))} (in all: {sorted(c)})" for c in cycles(edges)]
    assert not found, "modules that import each other:\n" + "\n".join(found)
