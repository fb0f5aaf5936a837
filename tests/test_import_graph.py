"""The import graph of src/sendvae: no cycle between modules, no import from a lower layer to a higher one.

The graph holds every import statement that runs: at a module's top and inside functions (a function-level
import still needs its target at call time, so it cannot hide a cycle or an upward edge), but not those
under ``if TYPE_CHECKING:``, which never run. And the library's lower folders import the package at
their modules' top, so that a module's head shows its dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "sendvae"

# Lowest first. A module may import from its own layer or any layer below it; within a layer only the
# no-cycle rule applies. The unit is the first part under sendvae (a subpackage or a top-level module);
# "sendvae" is the package's own __init__ (its names are imported lazily, through importlib).
LAYERS: list[set[str]] = [
    {"sendvae", "config_checks", "config", "runtime"},  # typed configs, I/O, processes: no torch models
    {"data", "models", "teachers", "losses", "metrics"},  # the components
    {"diffusion"},  # the flow-matching objective and the samplers, over the models and the latent store
    {"train", "align", "analysis", "evaluation"},  # the stage engines (align: the variants of VAE training)
    {"pipeline", "bench"},  # the engines composed: demo and study, benchmarks
    {"commands"},  # one thin module per CLI command
    {"cli"},
]

# Upward edges allowed for now, each (importer, imported) -> why, and what removes it. None today.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement of ``source`` that runs, wherever it
    stands; ``if TYPE_CHECKING:`` bodies are skipped (their ``else:`` is kept). ``from pkg import name``
    is an edge to ``pkg.name`` when that is a module in ``known``, else to ``pkg``."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit_one(stmt)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := owner(alias.name)) is not None:
                    out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else owner(base)
                if target is not None:
                    out.append((target, node.lineno))
        else:
            visit(node)

    visit(ast.parse(source))
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, over every module of src/sendvae."""
    paths = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
    known = set(paths)
    graph: dict[str, dict[str, int]] = {}
    for name, path in paths.items():
        edges: dict[str, int] = {}
        for target, line in runtime_imports(path.read_text(), name, path.name == "__init__.py", known):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, {})):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state and (found := dfs(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := dfs(v)):
            return found
    return None


# -- the reader -------------------------------------------------------------------------------------------

SAMPLE = """
from __future__ import annotations
import typing
from typing import TYPE_CHECKING
import torch
from ..models import vae
from ..config import option
import sendvae.runtime.log

if TYPE_CHECKING:
    from ..train.vae_config import TrainVAEConfig
else:
    from ..losses import align
if typing.TYPE_CHECKING:
    from ..teachers import Teacher

def build():
    from .sibling import thing
    class Inner:
        def method(self):
            from .. import cli
    return lambda: None
"""


def test_reader_sees_function_level_imports_and_skips_type_checking():
    known = {
        "sendvae", "sendvae.cli", "sendvae.config", "sendvae.models", "sendvae.models.vae", "sendvae.losses",
        "sendvae.losses.align", "sendvae.runtime", "sendvae.runtime.log", "sendvae.train",
        "sendvae.train.vae_config", "sendvae.teachers", "sendvae.data", "sendvae.data.sibling",
    }  # fmt: skip
    got = runtime_imports(SAMPLE, "sendvae.data.here", False, known)
    assert sorted(t for t, _ in got) == [
        "sendvae.cli",  # two functions deep: `from .. import cli`, a module
        "sendvae.config",  # `from ..config import option`: option is a name, the edge is to the module
        "sendvae.data.sibling",  # function level
        "sendvae.losses.align",  # the else of TYPE_CHECKING runs
        "sendvae.models.vae",  # `from pkg import submodule` is an edge to the submodule
        "sendvae.runtime.log",
    ]
    # a package's __init__ resolves its relative imports from itself
    init = runtime_imports("from .x import y", "sendvae.data", True, {"sendvae.data.x"})
    assert init == [("sendvae.data.x", 1)]


def test_cycle_finder_reports_the_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_graph_sees_the_real_function_level_imports():
    # the checks below could only pass vacuously if function-level imports were missed: cli.py imports
    # its error types and the log inside main(), the command modules their engines inside run()
    graph = import_graph()
    assert "sendvae.runtime.log" in graph["sendvae.cli"]
    assert "sendvae.train.vae_config" not in graph["sendvae.train.export"]  # only under TYPE_CHECKING
    assert sum(len(edges) for edges in graph.values()) > 300


# -- the rules ---------------------------------------------------------------------------------------------


def test_every_package_has_a_layer():
    units = {unit(m) for m in import_graph()}
    placed = set().union(*LAYERS)
    assert units <= placed, f"place these in LAYERS: {sorted(units - placed)}"
    assert placed <= units, f"LAYERS names what is not in the package: {sorted(placed - units)}"


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, (
        "import cycle (a placement bug: move the shared part below both):\n  "
        + "\n  ".join(f"{a} -> {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:]))
    )


def test_no_import_from_a_lower_layer_to_a_higher_one():
    graph = import_graph()
    upward = sorted(
        f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)}), line {line}"
        for a, edges in graph.items()
        for b, line in edges.items()
        if layer_of(b) > layer_of(a) and (a, b) not in UPWARD_EXCEPTIONS
    )
    assert not upward, "imports from a lower layer to a higher one:\n  " + "\n  ".join(upward)


def test_the_exceptions_are_still_needed():
    graph = import_graph()
    stale = [edge for edge in UPWARD_EXCEPTIONS if edge[1] not in graph.get(edge[0], {})]
    assert not stale, f"exceptions no longer needed (remove them): {stale}"


# Folders whose modules import the package at their top: a function-level import of our own modules
# there says why on its line or the line above (CLI start-up time, an optional dependency).
TOP_IMPORT_FOLDERS = ("models", "data", "metrics", "analysis", "runtime", "diffusion")
TOP_IMPORT_PENDING: set[str] = set()


def test_library_modules_import_the_package_at_their_top():
    unexplained = []
    for folder in TOP_IMPORT_FOLDERS:
        for path in sorted((PKG / folder).glob("*.py")):
            if str(path.relative_to(PKG)) in TOP_IMPORT_PENDING:
                continue
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for inner in ast.walk(node):
                    if not isinstance(inner, ast.ImportFrom):
                        continue
                    ours = inner.level or (inner.module or "").startswith("sendvae")
                    said = "#" in lines[inner.lineno - 1] or lines[inner.lineno - 2].strip().startswith("#")
                    if ours and not said:
                        unexplained.append(f"{path.relative_to(PKG)}:{inner.lineno}")
    assert not unexplained, "move these imports to the module's top, or say why not:\n  " + "\n  ".join(
        sorted(set(unexplained))
    )
