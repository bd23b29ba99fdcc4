"""TFF's worker_binary child must never outlive, or hang, the process that started it.

TFF 0.87 stops its worker with SIGINT and then waits for it without a timeout; a worker that
does not act on the SIGINT (seen under heavy load in this suite) hung the whole test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.fixtures_aggregator import REPO

_SCRIPT = textwrap.dedent("""
    import os, signal, time
    import numpy as np
    import tensorflow_federated as tff
    from simulation.tff_cleanup import stop_tff_workers, tff_worker_children

    @tff.tensorflow.computation(tff.types.TensorType(np.float32))
    def double(x):
        return x * 2

    assert double(np.float32(1.5)) == 3.0  # a computation, so a worker runs
    workers = tff_worker_children()
    assert workers, "TFF started no worker_binary"
    for w in workers:
        os.kill(w.pid, signal.SIGSTOP)  # a stopped process acts on no SIGINT: the hang's cause
    start = time.monotonic()
    stop_tff_workers(timeout=1.0)
    print("seconds", round(time.monotonic() - start, 2))
    assert not tff_worker_children(), "a worker_binary survived"
    assert double(np.float32(2.0)) == 4.0  # TFF still works: a new context starts a new worker
    stop_tff_workers()
""")


def test_a_worker_that_ignores_sigint_is_killed_instead_of_hanging_the_process():
    pytest.importorskip("tensorflow_federated")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    seconds = float(result.stdout.split("seconds")[1].split()[0])
    assert seconds < 30, result.stdout
