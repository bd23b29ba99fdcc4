"""Benchmarks measure the product, so they import only the product (and the bench's own modules),
never test fixtures: a fixture is built for speed or convenience, not to be what a user runs."""

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_benchmark_imports_the_tests():
    scripts = sorted(BENCH.glob("*.py"))
    assert scripts, f"no benchmarks found in {BENCH}"

    offenders = {p.name: sorted(m for m in _imported_modules(p) if m == "tests" or m.startswith("tests."))
                 for p in scripts}

    assert not {name: mods for name, mods in offenders.items() if mods}
