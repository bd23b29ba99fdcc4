"""Runs a training job one step at a time, only while the device stays eligible.

Production FL clients treat training as interruptible background work: the job runs while the
phone is idle, charging and on Wi-Fi, and "aborts when these conditions are no longer met"
(Bonawitz et al., 2019, https://arxiv.org/abs/1902.01046, §3). We go one step further than
aborting: before every step the scheduler re-reads the device state, so a job stops within one
step of a condition dropping; it then writes a checkpoint (the job's tensors, its next step and
the losses so far) and the next eligible window resumes it where it stopped — or abandons it
cleanly if its round's deadline has passed or the server moved on to another round.

The scheduler knows nothing about models: it drives any `Job` (see `edge_runtime.trainer`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors.numpy import load_file, save

from edge_runtime.device_state import DeviceStateProvider
from edge_runtime.eligibility import Eligibility, EligibilityPolicy, can_continue, check
from fedkb_core.durable import atomic_write, remove_temps

log = logging.getLogger(__name__)

COMPLETED, INTERRUPTED, ABANDONED = "completed", "interrupted", "abandoned"


@dataclasses.dataclass(frozen=True)
class JobKey:
    """What identifies a job across restarts: its round, model version and deadline."""

    round_id: int
    model_version: int
    deadline: float  # unix seconds; after it the round will not take the update


class Job(Protocol):
    """A resumable unit of work: numbered steps plus a tensor snapshot of everything it holds."""

    key: JobKey

    @property
    def total_steps(self) -> int:
        """How many steps the job has (read after `restore`, which may change it)."""

    def run_step(self, step: int) -> float:
        """Run step `step` (0-based, in order); return its loss."""

    def snapshot(self) -> dict[str, np.ndarray]:
        """Every tensor needed to continue after the last step run (weights, data)."""

    def restore(self, tensors: dict[str, np.ndarray]) -> None:
        """Go back to a snapshot taken by `snapshot`."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An interrupted job on disk."""

    key: JobKey
    next_step: int
    total_steps: int
    losses: tuple[float, ...]
    tensors: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """How a call to `Scheduler.run` ended."""

    status: str  # COMPLETED | INTERRUPTED | ABANDONED
    next_step: int  # steps done so far in total (== total_steps when completed)
    steps_run: int  # steps run by this call
    resumed_from: int | None = None  # the checkpoint's step, when this call resumed one
    reasons: tuple[str, ...] = ()  # why it stopped (eligibility reasons, "expired", ...)
    losses: tuple[float, ...] = ()  # every step's loss, resumed steps included


class CheckpointStore:
    """One job checkpoint in one safetensors file, replaced atomically (`fedkb_core.durable`).

    A crash while writing leaves the previous checkpoint (or none), never half of one.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def save(self, checkpoint: Checkpoint) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**{k: str(v) for k, v in dataclasses.asdict(checkpoint.key).items()},
                "next_step": str(checkpoint.next_step), "total_steps": str(checkpoint.total_steps),
                "losses": json.dumps(list(checkpoint.losses))}
        atomic_write(self.path, save({k: np.ascontiguousarray(v) for k, v in checkpoint.tensors.items()},
                                     metadata=meta))

    def load(self) -> Checkpoint | None:
        """The checkpoint, or None when there is none or it is unreadable (then it is removed)."""
        if not self.path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="numpy") as f:
                meta = f.metadata() or {}
            key = JobKey(round_id=int(meta["round_id"]), model_version=int(meta["model_version"]),
                         deadline=float(meta["deadline"]))
            return Checkpoint(key, int(meta["next_step"]), int(meta["total_steps"]),
                              tuple(float(x) for x in json.loads(meta["losses"])), load_file(str(self.path)))
        except Exception as err:  # a torn or foreign file: nothing to resume
            log.warning("discarding unreadable job checkpoint %s (%s)", self.path, err)
            self.clear()
            return None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        remove_temps(self.path.parent, self.path.name)


class Scheduler:
    """Decides when jobs may start and runs them step by step under the eligibility policy.

    Args:
        state: where the device state comes from (read before every step).
        policy: the eligibility conditions.
        checkpoints: where an interrupted job is kept.
        clock: unix seconds, compared with round deadlines.
    """

    def __init__(self, *, state: DeviceStateProvider, policy: EligibilityPolicy, checkpoints: CheckpointStore,
                 clock: Callable[[], float] = time.time):
        self.state, self.policy, self.checkpoints, self._clock = state, policy, checkpoints, clock

    def may_start(self, *, new_examples: int) -> Eligibility:
        """Whether a job may start now. A pending checkpoint waives the new-examples rule:
        finishing interrupted work needs no new text."""
        if self.pending() is not None:
            return can_continue(self.state.current(), self.policy)
        return check(self.state.current(), self.policy, new_examples=new_examples)

    def can_run(self) -> Eligibility:
        """Whether the device state allows work now (training or uploading), examples aside."""
        return can_continue(self.state.current(), self.policy)

    def pending(self) -> Checkpoint | None:
        """The interrupted job, if any (expired ones are abandoned here)."""
        checkpoint = self.checkpoints.load()
        if checkpoint is not None and self._clock() >= checkpoint.key.deadline:
            log.info("abandoning interrupted job of round %d: its deadline passed", checkpoint.key.round_id)
            self.checkpoints.clear()
            return None
        return checkpoint

    def abandon_unless(self, round_id: int | None) -> bool:
        """Drop a pending job that is not for `round_id` (the server's current task). Returns
        whether one was dropped."""
        checkpoint = self.pending()
        if checkpoint is not None and checkpoint.key.round_id != round_id:
            log.info("abandoning interrupted job of round %d: the server now offers %s", checkpoint.key.round_id,
                     f"round {round_id}" if round_id is not None else "no task")
            self.checkpoints.clear()
            return True
        return False

    def run(self, job: Job) -> JobOutcome:
        """Run `job` from its checkpoint (if one matches) until done, interrupted or expired.

        Before each step the device state is read; if a condition fails the job is
        checkpointed and INTERRUPTED is returned, so at most the step already under way runs
        after a condition drops.
        """
        key = job.key
        if self._clock() >= key.deadline:
            # Decided before touching the job: one built to be restored has no steps until its
            # checkpoint is loaded, and an expired checkpoint is worth nothing anyway.
            self.checkpoints.clear()
            return JobOutcome(ABANDONED, 0, 0, None, ("expired",))
        start, losses, resumed_from = 0, [], None
        checkpoint = self.checkpoints.load()  # not pending(): its second clock read could expire it under us
        if checkpoint is not None:
            if checkpoint.key == key:
                job.restore(checkpoint.tensors)
                start, losses, resumed_from = checkpoint.next_step, list(checkpoint.losses), checkpoint.next_step
                log.info("resuming round %d job at step %d of %d", key.round_id, start, job.total_steps)
            else:
                log.info("abandoning interrupted job of round %d for round %d", checkpoint.key.round_id, key.round_id)
                self.checkpoints.clear()

        total = job.total_steps
        for step in range(start, total):
            if self._clock() >= key.deadline:
                self.checkpoints.clear()
                return JobOutcome(ABANDONED, step, step - start, resumed_from, ("expired",), tuple(losses))
            verdict = can_continue(self.state.current(), self.policy)
            if not verdict:
                self.checkpoints.save(Checkpoint(key, step, total, tuple(losses), job.snapshot()))
                log.info("round %d job interrupted before step %d of %d (%s); checkpointed", key.round_id, step,
                         total, ", ".join(verdict.reasons))
                return JobOutcome(INTERRUPTED, step, step - start, resumed_from, verdict.reasons, tuple(losses))
            losses.append(float(job.run_step(step)))
        self.checkpoints.clear()
        return JobOutcome(COMPLETED, total, total - start, resumed_from, (), tuple(losses))
