"""The edge runtime must never load TensorFlow: a phone has only LiteRT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_WALK = """
import importlib, pkgutil, sys
import edge_runtime
names = ["edge_runtime"] + [m.name for m in pkgutil.walk_packages(edge_runtime.__path__, "edge_runtime.")]
names.append("fedkb.commands.device")
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tensorflow_federated", "jax"))
print(len(names), "modules;", "heavy:", heavy)
assert not heavy, heavy
assert len(names) >= 11, names
"""


def test_no_module_imports_tensorflow():
    # A fresh interpreter: this test process may already hold TensorFlow from other tests.
    result = subprocess.run([sys.executable, "-c", _WALK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "heavy: []" in result.stdout

