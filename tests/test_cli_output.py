"""Clean command-line output: LiteRT's start-up notice is filtered out of stderr (and nothing else
is), and log lines print above a live progress bar instead of being glued to its end."""

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from edge_runtime.litert_interpreter import NOTICE, without_notice
from tests.fixtures_model import *  # noqa: F401,F403
from tests.fixtures_model import assert_seeded_model_used, seed_initial_model

TEXT_NOTICE = NOTICE.decode()


def _fedkb(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fedkb", *args], capture_output=True, text=True, timeout=timeout)


def test_the_filter_drops_the_notice_and_keeps_everything_else(capfd):
    with without_notice():
        os.write(2, NOTICE + b"\n")
        os.write(2, b"ERROR: Didn't find op for builtin opcode 'FOO'\n")
        os.write(2, b"WARNING: " + NOTICE + b" (not the notice itself)\n")
    os.write(2, b"after\n")

    err = capfd.readouterr().err
    assert err == ("ERROR: Didn't find op for builtin opcode 'FOO'\n"
                   f"WARNING: {TEXT_NOTICE} (not the notice itself)\nafter\n")


def test_what_was_written_before_an_exception_still_shows(capfd):
    with pytest.raises(ValueError, match="corrupt"):
        with without_notice():
            os.write(2, b"ERROR: the runtime's own words\n")
            raise ValueError("corrupt model")
    os.write(2, b"stderr restored\n")

    assert capfd.readouterr().err == "ERROR: the runtime's own words\nstderr restored\n"


def test_litert_prints_the_notice_on_this_machine(tiny_model):
    # The control for the tests below: without the filter, the runtime does print the line here.
    code = ("from ai_edge_litert.interpreter import Interpreter; "
            f"Interpreter(model_path={str(tiny_model / 'inference.tflite')!r}, num_threads=1).allocate_tensors()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert TEXT_NOTICE in result.stderr


def test_fedkb_suggest_prints_no_litert_notice(tiny_model):
    result = _fedkb("suggest", "--model", str(tiny_model), "to be or not to")

    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 3
    assert TEXT_NOTICE not in result.stderr, result.stderr


def test_fedkb_suggest_still_reports_a_corrupt_model(tiny_model, tmp_path):
    broken = tmp_path / "v1"
    shutil.copytree(tiny_model, broken)
    model = (broken / "inference.tflite").read_bytes()
    (broken / "inference.tflite").write_bytes(model[: len(model) // 3])

    result = _fedkb("suggest", "--model", str(broken), "to be")

    assert result.returncode == 2
    assert "fedkb suggest: error:" in result.stderr and "inference.tflite" in result.stderr, result.stderr
    assert TEXT_NOTICE not in result.stderr


def _run_in_terminal(args: list[str], timeout: float) -> tuple[int, str]:
    """Run `python -m fedkb ARGS` on a pseudo-terminal 160 columns wide (tqdm draws its bars only
    on a terminal that has a width); return its exit status and everything it printed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.execv(sys.executable, [sys.executable, "-m", "fedkb", *args])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 1.0)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
        else:
            os.kill(pid, signal.SIGKILL)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), output.decode(errors="replace")
    finally:
        os.close(fd)


def test_simulate_logs_above_its_progress_bar_without_the_litert_notice(tiny_data, tiny_model, tmp_path):
    # The run's initial model is tiny_model, the export of these flags on tiny_data (seed_initial_model):
    # converting it makes no LiteRT interpreter, the devices' and the evaluation's do.
    seeded = seed_initial_model(tmp_path / "run", tiny_model)
    status, output = _run_in_terminal(
        ["simulate", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--clients", "6",
         "--clients-per-round", "2", "--rounds", "3", "--workers", "1", "--round-hours", "0.5",
         "--embed-dim", "8", "--lstm-units", "16", "--batch-size", "4", "--seq-len", "6",
         "--max-examples", "16", "--eval-windows", "16", "--eval-words", "10"], timeout=300)

    assert status == 0, output
    assert_seeded_model_used(json.loads((tmp_path / "run" / "report.json").read_text()), seeded)
    assert re.search(r"rounds:\s+\d+%\|", output), "no progress bar was drawn:\n" + output
    round_logs = re.findall(r"INFO simulation\.fleet: round \d+", output)
    assert len(round_logs) == 3, output
    # A log line starts at the beginning of a terminal line: right after a newline or after tqdm
    # has cleared the bar with a carriage return, never right after a bar's text.
    glued = re.findall(r"[^\r\n](\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?:INFO|WARNING|ERROR))", output)
    assert not glued, output
    assert TEXT_NOTICE not in output
    # Six emulated phones enroll, download and swap models; none of that is the user's business at INFO.
    assert not re.findall(r"INFO edge_runtime\.", output), output
