"""Make sure TFF's C++ `worker_binary` child does not outlive the computation that started it.

TFF 0.87 runs computations in a `worker_binary` child process and stops it only when its
service manager is garbage-collected; a process can exit with the child still running, and a
shell pipe reading from it then never closes. We terminate our own such children explicitly.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import sys

import psutil

_WORKER_NAME = "worker_binary"


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
    before = len(tff_worker_children())
    tff = sys.modules.get("tensorflow_federated")
    if tff is not None and before:
        with contextlib.suppress(Exception):
            tff.backends.native.set_sync_local_cpp_execution_context()
        gc.collect()
    workers = tff_worker_children()
    for proc in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(workers, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return before


atexit.register(stop_tff_workers)
