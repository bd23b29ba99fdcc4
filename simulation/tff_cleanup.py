"""Make sure TFF's C++ `worker_binary` child does not outlive the computation that started it.

TFF 0.87 runs computations in a `worker_binary` child process and stops it only when its
service manager is garbage-collected; a process can exit with the child still running, and a
shell pipe reading from it then never closes. We terminate our own such children explicitly.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import sys
import threading

import psutil

_WORKER_NAME = "worker_binary"
log = logging.getLogger(__name__)


def tff_worker_children() -> list[psutil.Process]:
    """This process's descendants that are TFF worker binaries (and still alive)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if _WORKER_NAME in child.name() or any(_WORKER_NAME in part for part in child.cmdline()[:1]):
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_tff_workers(timeout: float = 5.0) -> int:
    """Stop every TFF worker child; return how many there were.

    First the clean way: install a fresh execution context and collect the old one, whose
    service manager then stops its worker itself (and TFF stays usable: the new context starts a
    worker when next needed). Killing the worker behind TFF's back instead would leave its
    service manager holding a dead pid, and the next computation would fail. Whatever remains
    after that is terminated.
    """
    workers = tff_worker_children()
    before = len(workers)
    tff = sys.modules.get("tensorflow_federated")
    if tff is not None and before:
        # TFF's service manager stops its worker with SIGINT and then waits for it with no
        # timeout; a worker that ignores the SIGINT (seen under load) would hang this process
        # for good. The watchdog kills such a worker, which ends that wait.
        watchdog = threading.Timer(timeout, _kill, args=(workers,))
        watchdog.daemon = True
        watchdog.start()
        try:
            with contextlib.suppress(Exception):
                tff.backends.native.set_sync_local_cpp_execution_context()
            gc.collect()
        finally:
            watchdog.cancel()
    workers = tff_worker_children()
    for proc in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return before


def _kill(workers: list[psutil.Process]) -> None:
    for proc in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            log.warning("TFF's worker_binary %d did not stop on SIGINT within the timeout: killing it", proc.pid)
            proc.kill()


atexit.register(stop_tff_workers)
