"""The pinned environment: the pieces docs/architecture.md promises import and fit together."""

import subprocess
import sys

import pytest


def test_tensorflow_federated_imports_with_fedavg_builder():
    # In a child process: importing TFF pulls TensorFlow, and a separate process also proves no
    # TFF worker_binary child outlives it (the pipe would hang on a stray child).
    code = (
        "import tensorflow as tf, tensorflow_federated as tff, packaging;"
        "assert tf.__version__.startswith('2.14'), tf.__version__;"
        "assert callable(tff.learning.algorithms.build_weighted_fed_avg);"
        "print(tff.__version__, packaging.__version__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tff_version, packaging_version = result.stdout.split()
    assert tff_version == "0.87.0"
    assert packaging_version.startswith("22."), "packaging>=24 breaks tensorflow-privacy (TFF)"


def test_litert_interpreter_imports():
    from ai_edge_litert.interpreter import Interpreter

    assert Interpreter is not None


@pytest.mark.parametrize("argv", [["--help"], ["data", "prepare", "--help"]])
def test_console_script_help(argv):
    result = subprocess.run([sys.executable, "-m", "fedkb", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: fedkb" in result.stdout
