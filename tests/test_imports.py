"""The import graph of `eir`: no cycle, the data layer never reaches up into `eir/train`, and the pure
core (tasks, channels, metrics, losses, paste, the instance store, methods, pseudo-labels, the step
planner) never imports Ray.

One fresh interpreter imports every module under eir/ with `__import__` and
`importlib.import_module` wrapped, recording which module executed each import; what a module pulls
in when imported alone is then the closure of its edges (package `__init__`s included). A cycle can
also hide behind imports inside functions, so the source is read too: counting those imports (not
the `if TYPE_CHECKING:` ones), eir's modules still form no cycle.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_FILES = {
    ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
    for path in (REPO / "eir").rglob("*.py")
}
MODULES = sorted(MODULE_FILES)
PURE_CORE = (
    "eir.tasks",
    "eir.channels",
    "eir.labels",
    "eir.metrics",
    "eir.losses",
    "eir.pseudo",
    "eir.replay.paste",
    "eir.replay.store",
    "eir.methods",
    "eir.data.stream_spec",
    "eir.train.plan",
    "eir.train.planner",
)

RECORDER = r"""
import builtins, importlib, importlib.util, json, sys

edges = {}
real_import, real_import_module = builtins.__import__, importlib.import_module


def record(importer, target):
    if importer and target:
        edges.setdefault(importer, set()).add(target)


def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = real_import(name, globals, locals, fromlist, level)
    importer = (globals or {}).get("__name__")
    absolute = importlib.util.resolve_name("." * level + name, globals.get("__package__")) if level else name
    record(importer, absolute)
    for item in fromlist or ():
        if f"{absolute}.{item}" in sys.modules:  # `from package import submodule`
            record(importer, f"{absolute}.{item}")
    return module


def recording_import_module(name, package=None):
    module = real_import_module(name, package)
    record(sys._getframe(1).f_globals.get("__name__"), module.__name__)
    return module


builtins.__import__, importlib.import_module = recording_import, recording_import_module
for name in json.loads(sys.argv[1]):
    real_import_module(name)
edges["<loaded>"] = sorted(sys.modules)
print(json.dumps({importer: sorted(targets) for importer, targets in edges.items()}))
"""


@pytest.fixture(scope="module")
def edges() -> dict[str, list[str]]:
    """Module → the modules its module-level code imports, from one fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", RECORDER, json.dumps(MODULES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def pulled_in(edges: dict[str, list[str]], module: str) -> set[str]:
    """Every module that importing `module` alone executes (its parents' `__init__`s included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for candidate in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if candidate not in seen:
                seen.add(candidate)
                todo.extend(edges.get(candidate, ()))
    return seen


def test_the_recorder_sees_module_level_imports(edges: dict[str, list[str]]) -> None:
    """A control: the trainer does import Ray, and a package's `__init__` is followed."""
    assert "ray.train" in pulled_in(edges, "eir.train.step")
    assert "eir.methods.eir" in pulled_in(edges, "eir.methods.base")


def test_every_module_imports(edges: dict[str, list[str]]) -> None:
    assert sorted(set(MODULES) - set(edges["<loaded>"])) == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("eir.data.")])
def test_the_data_layer_never_imports_train(edges: dict[str, list[str]], module: str) -> None:
    assert sorted(m for m in pulled_in(edges, module) if m.startswith("eir.train")) == []


@pytest.mark.parametrize("module", PURE_CORE)
def test_the_pure_core_never_imports_ray(edges: dict[str, list[str]], module: str) -> None:
    assert sorted(m for m in pulled_in(edges, module) if m == "ray" or m.startswith("ray.")) == []


def test_no_import_cycle_inside_eir(edges: dict[str, list[str]]) -> None:
    graph = {
        m: [t for t in targets if t.startswith("eir.") and t != m]
        for m, targets in edges.items()
        if m.startswith("eir.")
    }
    cycle = _find_cycle(graph)
    assert cycle is None, " → ".join(cycle or [])


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path that returns to its start, or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def static_edges() -> dict[str, list[str]]:
    """eir module → the eir modules its source imports anywhere (functions included, TYPE_CHECKING not)."""
    graph: dict[str, list[str]] = {}
    for module, path in MODULE_FILES.items():
        tree = ast.parse(path.read_text())
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        typing_only = {
            id(node)
            for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
            for node in ast.walk(branch)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (
                    importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                    if node.level
                    else node.module
                )
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph.setdefault(module, []).extend(t for t in targets if t in MODULE_FILES and t != module)
    return graph


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    cycle = _find_cycle(static_edges())
    assert cycle is None, " → ".join(cycle or [])


def test_the_pure_core_imports_without_ray_in_a_fresh_interpreter() -> None:
    """The same claim checked directly: with `ray` unimportable, the pure core still imports."""
    code = f"import sys; sys.modules['ray'] = None\nimport {', '.join(PURE_CORE)}"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_import_inside_a_function_says_why() -> None:
    """Such an import is allowed where a heavy optional dependency justifies it, with a comment saying so."""
    unexplained = []
    for module, path in MODULE_FILES.items():
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in here and not above.startswith("#"):
                        unexplained.append(f"{module}:{node.lineno}: {here.strip()}")
    assert unexplained == []
