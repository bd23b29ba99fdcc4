"""The device's own limits on what a server may make it do.

A phone cannot trust that the server is well (a bug, a bad config push) or that it is the server
at all (a hostile network). Whatever arrives is checked against limits the device itself holds,
before any work: how much it will read or write for one reply, one file or one model version;
how much free storage it keeps; which task settings it will run; how long it will wait.
A reply outside them is refused with one clear log line, and the device carries on.

`DownloadLimits` bounds bytes (every JSON reply, the manifest, each model file, a whole version,
and the free space left after a download). `TaskBounds` bounds a task's settings and the
retry-after the server asks for. Both are `DeviceConfig` fields (`fedkb device --limits FILE`
overrides any of them); the defaults fit the default model with room to grow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fedkb_core.errors import FedkbError
from fedkb_core.protocol import RoundTask
from fedkb_core.secagg.integer_encoding import SecAggGrid
from fedkb_core.update_encoding import BLOCK, SECAGG, TASK_ENCODINGS, UpdateEncoding

MiB = 1 << 20
_MAX_ID = 2 ** 63 - 1  # round ids and versions end up in SQLite and in file names


@dataclasses.dataclass(frozen=True)
class DownloadLimits:
    """How many bytes the device reads or writes for what a server sends."""

    max_json_bytes: int = 64 * 1024  # enrollment, check-in, upload answers, errors (~200 bytes each)
    max_manifest_bytes: int = 4 * MiB  # the default model's manifest is ~0.1 MiB
    max_file_bytes: int = 64 * MiB  # one model file (default model: 4.9 MB trainable)
    max_version_bytes: int = 160 * MiB  # all files of one version
    max_files: int = 16  # files one manifest may list
    min_free_bytes: int = 64 * MiB  # storage left free after a version is downloaded

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{field.name} must be a non-negative integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TaskBounds:
    """The task settings this device runs, and the waits it accepts."""

    max_learning_rate: float = 10.0  # > 0 and at most this
    max_clip_norm: float = 1e4  # > 0 and at most this
    max_epochs: int = 50
    max_examples: int = 100_000  # the largest `max_examples` a task may ask for
    max_steps: int = 5_000  # epochs × batches per epoch on this device's windows
    encodings: tuple[str, ...] = TASK_ENCODINGS  # `secagg`: this device takes part in secure aggregation
    min_retry_after: float = 1.0  # seconds: a server asking for less gets this
    max_retry_after: float = 6 * 3600.0  # seconds: a server asking for more gets this

    def __post_init__(self):
        floats = ("max_learning_rate", "max_clip_norm", "min_retry_after", "max_retry_after")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        for name in ("max_epochs", "max_examples", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_retry_after > self.max_retry_after:
            raise ValueError("min_retry_after must not exceed max_retry_after")
        unknown = [e for e in self.encodings if e not in TASK_ENCODINGS]
        if unknown or not self.encodings:
            raise ValueError(f"encodings must be a non-empty subset of {TASK_ENCODINGS}, got {self.encodings!r}")


class TaskRefused(FedkbError):
    """A task outside the device's bounds: not run (`code` "task_out_of_bounds")."""

    code = "task_out_of_bounds"


def task_problems(task: RoundTask, bounds: TaskBounds) -> list[str]:
    """Every way `task` leaves `bounds` (empty: the device may run it)."""
    problems = []

    def number_in(name: str, value, low: float, high: float, *, low_open: bool = False) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            low < value if low_open else low <= value) and value <= high
        if not ok:
            problems.append(f"{name} {value!r} is outside {'(' if low_open else '['}{low:g}, {high:g}]")

    number_in("round_id", task.round_id, 0, _MAX_ID)
    number_in("model_version", task.model_version, 0, _MAX_ID)
    number_in("learning_rate", task.learning_rate, 0.0, bounds.max_learning_rate, low_open=True)
    number_in("clip_norm", task.clip_norm, 0.0, bounds.max_clip_norm, low_open=True)
    number_in("epochs", task.epochs, 1, bounds.max_epochs)
    number_in("max_examples", task.max_examples, 1, bounds.max_examples)
    number_in("batch_size", task.batch_size, 1, _MAX_ID)  # and equal to the model's (checked with it)
    if not isinstance(task.deadline, float) or not math.isfinite(task.deadline):
        problems.append(f"deadline {task.deadline!r} is not a finite time")
    if task.encoding not in bounds.encodings:
        problems.append(f"encoding {task.encoding!r} is not one of {', '.join(bounds.encodings)}")
    else:
        problems += UpdateEncoding(task.encoding, task.update_bits, task.rotation_seed).problems()
        problems += _secagg_problems(task) if not problems else []
    return problems


def _secagg_problems(task: RoundTask) -> list[str]:
    """A `secagg` task must carry its parameters, and they must make a grid (docs/secure_aggregation.md,
    "Task"; the weight count comes from the manifest later, so a stand-in length here: one value, or
    one block per tuned step; the step count is checked against the model's blocks at encoding)."""
    if task.encoding != SECAGG:
        return [] if task.secagg is None else [f"secagg parameters on a {task.encoding} task"]
    if task.secagg is None:
        return ["a secagg task without its secagg parameters (modulus_bits)"]
    steps = task.secagg.steps
    return SecAggGrid.for_task(task, BLOCK * len(steps) if steps else 1).problems()


def check_task(task: RoundTask, bounds: TaskBounds) -> None:
    """Refuse a task outside the bounds, naming every reason.

    Raises:
        TaskRefused: the task must not run.
    """
    problems = task_problems(task, bounds)
    if problems:
        raise TaskRefused(f"round {task.round_id}: task refused: {'; '.join(problems)}")


def check_steps(task: RoundTask, num_windows: int, bounds: TaskBounds) -> int:
    """The job's step count on `num_windows` windows, refused when it exceeds `max_steps`.

    Raises:
        TaskRefused: epochs × batches per epoch is more than the device will run.
    """
    per_epoch = math.ceil(min(num_windows, task.max_examples) / task.batch_size)
    steps = task.epochs * per_epoch
    if steps > bounds.max_steps:
        raise TaskRefused(f"round {task.round_id}: task refused: {task.epochs} epochs of {per_epoch} steps is "
                          f"{steps} steps, more than the {bounds.max_steps} this device runs")
    return steps


def clamp_retry_after(seconds: float | None, bounds: TaskBounds) -> float:
    """The server's retry-after within [min_retry_after, max_retry_after] (None or NaN: the minimum)."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds):
        return bounds.min_retry_after
    return min(bounds.max_retry_after, max(bounds.min_retry_after, float(seconds)))


def limits_from_json(body: Mapping[str, Any], *, where: str = "limits") -> tuple[DownloadLimits, TaskBounds]:
    """`DownloadLimits` and `TaskBounds` from one flat JSON object of their field names.

    Raises:
        FedkbError: an unknown key or a value out of range, naming it.
    """
    if not isinstance(body, Mapping):
        raise FedkbError(f"{where}: expected a JSON object")
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (DownloadLimits, TaskBounds)}
    unknown = sorted(set(body) - fields[DownloadLimits] - fields[TaskBounds])
    if unknown:
        raise FedkbError(f"{where}: unknown keys {unknown}; known: {sorted(fields[DownloadLimits] | fields[TaskBounds])}")
    try:
        downloads = DownloadLimits(**{k: v for k, v in body.items() if k in fields[DownloadLimits]})
        task = TaskBounds(**{k: (tuple(v) if k == "encodings" and isinstance(v, list) else v)
                             for k, v in body.items() if k in fields[TaskBounds]})
    except (ValueError, TypeError) as err:
        raise FedkbError(f"{where}: {err}") from None
    return downloads, task
