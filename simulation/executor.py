"""Where emulated device work runs: an interface, so a distributed engine can take over later.

The simulator hands an executor a list of independent device jobs (plain picklable arguments)
and gets results back in completion order. `ProcessExecutor` spreads them over the machine's
cores; `InlineExecutor` runs them in this process (debugging, and tests of the orchestration).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol


class Executor(Protocol):
    """Runs `fn(job)` for every job and yields (job, result or exception) as each finishes."""

    def run(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> Iterator[tuple[Any, Any]]: ...

    def close(self) -> None: ...


class InlineExecutor:
    """One job after another, in this process."""

    def run(self, fn, jobs):
        for job in jobs:
            try:
                yield job, fn(job)
            except Exception as err:  # reported per job, like the process pool does
                yield job, err

    def close(self) -> None:
        pass


class ProcessExecutor:
    """A pool of worker processes that lives across rounds (interpreters load once per worker).

    Uses the `spawn` start method: forking a process that has loaded TensorFlow or started
    threads is unsafe.
    """

    def __init__(self, workers: int | None = None, *, initializer: Callable | None = None, initargs: tuple = ()):
        self.workers = workers or max(1, os.cpu_count() or 1)
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=initializer, initargs=initargs,
        )

    def run(self, fn, jobs):
        futures = {self._pool.submit(fn, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                yield job, future.result()
            except Exception as err:
                yield job, err

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
