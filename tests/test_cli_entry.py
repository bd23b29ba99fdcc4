"""The installed `fedkb` console script reaches every command, from any working directory.

Run from a temporary folder so the repository is not on sys.path: a package missing from
setup.cfg's package list then fails here, not on a user's machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedkb.cli import _COMMAND_MODULES

FEDKB = Path(sys.executable).with_name("fedkb")
COMMANDS = [name.rsplit(".", 1)[1] for name in _COMMAND_MODULES]


@pytest.mark.skipif(not FEDKB.exists(), reason=f"no installed console script at {FEDKB} (run `make test`)")
@pytest.mark.parametrize("command", COMMANDS)
def test_console_script_reaches_command(command, tmp_path):
    result = subprocess.run([str(FEDKB), command, "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"usage: fedkb {command}" in result.stdout


@pytest.mark.skipif(not FEDKB.exists(), reason=f"no installed console script at {FEDKB} (run `make test`)")
def test_every_top_level_package_is_installed(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    packages = sorted(p.name for p in repo.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
    code = "import importlib, sys; [importlib.import_module(n) for n in sys.argv[1:]]; print('ok')"
    result = subprocess.run([sys.executable, "-c", code, *packages], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"{packages}: {result.stderr}"
