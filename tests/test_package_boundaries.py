"""The package boundaries of docs/architecture.md, checked on the code as it is.

Two views, because each misses something the other sees:
  * static: every `import` statement in the product's packages (function-level ones included,
    since a lazy import is still a dependency), resolved to the repository's modules; cycles
    between packages or between modules fail, and so does a forbidden edge reached transitively;
  * at run time: importing every module of `edge_runtime` (and of `aggregator`) in a fresh
    interpreter must not load TensorFlow (or Flask), whatever a module does at import time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedkb", "fedkb_core", "datasets", "model", "export", "edge_runtime", "aggregator", "simulation")
TENSORFLOW = ("tensorflow", "keras", "tensorflow_federated", "tensorflow_privacy", "jax")
WEB = ("flask", "werkzeug", "gunicorn")

# package -> top-level names it must never import, directly or through the repository's modules
FORBIDDEN = {
    "fedkb_core": TENSORFLOW + WEB + tuple(p for p in PACKAGES if p != "fedkb_core"),
    "edge_runtime": TENSORFLOW + WEB + ("aggregator", "simulation", "export", "fedkb"),
    "aggregator": TENSORFLOW + ("edge_runtime", "simulation", "export", "fedkb"),
    "datasets": TENSORFLOW + WEB,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(f): f for p in PACKAGES for f in sorted((REPO / p).rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules `name` imports: repository modules by full name, outside ones by top-level name."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known and "." in target:
            target = target.rsplit(".", 1)[0]  # `import a.b.c` of a name inside a module
        out.add(target if target in known else target.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            add(module)
            for alias in node.names:  # `from pkg import submodule`
                if f"{module}.{alias.name}" in known:
                    out.add(f"{module}.{alias.name}")
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for target in list(out):
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in known)
    out.discard(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = _modules()
    assert len(known) > 60, sorted(known)
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as a path whose first and last node agree, or None."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(edges):
        if node not in colour and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    return module.split(".")[0]


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_packages(graph):
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        for target in targets:
            if _package(target) in PACKAGES and _package(target) != _package(module):
                edges[_package(module)].add(_package(target))
    assert _cycle(edges) is None, f"packages import each other: {' -> '.join(_cycle(edges))}"


def test_no_import_cycle_between_modules(graph):
    # A package's __init__ importing its own submodules is how packages work, not a cycle of concepts.
    edges = {m: {t for t in ts if t in graph and not m.startswith(t + ".")} for m, ts in graph.items()}
    assert _cycle(edges) is None, f"modules import each other: {' -> '.join(_cycle(edges))}"


def _reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Everything `start`'s modules import, transitively, each with the module that imports it."""
    seen: dict[str, str] = {}
    todo = [m for m in graph if _package(m) == start]
    while todo:
        module = todo.pop()
        for target in graph.get(module, ()):
            if target not in seen:
                seen[target] = module
                if target in graph:
                    todo.append(target)
    return seen


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_reaches_a_forbidden_import(graph, package):
    reached = _reachable(graph, package)
    bad = {t: via for t, via in reached.items() if _package(t) in FORBIDDEN[package] and _package(t) != package}
    assert not bad, f"{package} reaches: " + ", ".join(f"{t} (imported by {via})" for t, via in sorted(bad.items()))


def test_the_walk_sees_real_edges(graph):
    # Guards the walker itself: edges that exist must be found, or every assertion above is vacuous.
    assert "fedkb_core.wire" in graph["aggregator.routes.training"]
    assert "flask" in graph["aggregator.app"]
    assert "tensorflow" in graph["model.keras_model"]
    assert "fedkb_core.clipping" in graph["edge_runtime.trainer"]


_RUNTIME_WALK = """
import importlib, pkgutil, sys
top = sys.argv[1]
forbidden = set(sys.argv[2].split(","))
package = importlib.import_module(top)
names = [top] + [m.name for m in pkgutil.walk_packages(getattr(package, "__path__", []), top + ".")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(len(names), "modules; loaded:", loaded)
assert not loaded, loaded
"""


@pytest.mark.parametrize("package,forbidden", [
    ("edge_runtime", TENSORFLOW + WEB + ("aggregator",)),
    ("fedkb_core", TENSORFLOW + WEB),
    ("aggregator", TENSORFLOW),
    ("fedkb.commands.device", TENSORFLOW + WEB),  # what a phone-like host runs
])
def test_importing_every_module_loads_nothing_forbidden(package, forbidden):
    # A fresh interpreter: this test process may already hold TensorFlow from other tests.
    result = subprocess.run([sys.executable, "-c", _RUNTIME_WALK, package, ",".join(forbidden)], cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(result.stdout.split()[0]) >= (1 if "commands" in package else 5), result.stdout


def test_code_cites_no_file_outside_the_repository():
    # The design contract is docs/architecture.md; a pointer to a document outside the repository
    # is one a reader of a clone cannot follow.
    outside = ("DESIGN.md", "STYLE.md", "DEVELOPERS.md", "../shared")
    files = [f for p in (*PACKAGES, "tests", "bench", "requirements") for f in (REPO / p).rglob("*")
             if f.is_file() and f.suffix in (".py", ".txt", ".md", ".toml", ".cfg") and f.name != Path(__file__).name]
    files += [REPO / "README.md", REPO / "Makefile", REPO / "setup.cfg"]
    cited = [f"{f.relative_to(REPO)}: {word}" for f in files for word in outside if word in f.read_text()]
    assert not cited, cited
