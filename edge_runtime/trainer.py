"""One round of local training on the device: the client half of FedAvg.

FedAvg's client update (McMahan et al., 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", https://arxiv.org/abs/1602.05629, Algorithm 1): start from
the global weights, run E epochs of minibatch SGD over the local examples, and send back
Δ = w_local − w_global with the number of examples as its weight. Δ is clipped to the task's L2
norm before it leaves the device (`fedkb_core.clipping`, shared with the server), which bounds any
one user's influence (McMahan et al., 2018, https://arxiv.org/abs/1710.06963).

`TrainingJob` is that update as a resumable `scheduler.Job`: the batch order is fixed by the
seed, a snapshot holds the local weights and the job's windows, so an interrupted job resumes
to exactly the result of an uninterrupted one. Deterministic for a given seed. The snapshot also
keeps which messages the windows came from (`up_to_id`), so a resumed job marks as trained only
what it trained on, not the messages typed while it was interrupted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from datasets.windows import Windows, iterate_batches
from edge_runtime.litert_model import TrainableModel, Weights
from edge_runtime.scheduler import JobKey
from fedkb_core.clipping import clip_by_global_norm
from fedkb_core.errors import FedkbError
from fedkb_core.protocol import RoundTask

_W, _X, _Y, _MASK, _UP_TO = "weights/", "data/x", "data/y", "data/mask", "data/up_to_id"


@dataclasses.dataclass(frozen=True)
class LocalUpdate:
    """What a finished job produces: the clipped Δ and what the server needs to weigh it."""

    deltas: dict[str, np.ndarray]  # clipped, float32, by weight name
    num_examples: int  # windows trained on (FedAvg's weight)
    update_norm: float  # L2 norm of Δ before clipping
    clip_norm: float
    mean_loss: float  # mean training loss over the job's steps
    steps: int


def job_key(task: RoundTask) -> JobKey:
    """What identifies a task's job across restarts: a checkpoint resumes only under the same key."""
    return JobKey(round_id=task.round_id, model_version=task.model_version, deadline=task.deadline)


def sample_window_indices(count: int, max_examples: int, *, seed: int) -> np.ndarray:
    """Which of `count` windows a job trains on, in order: all of them, or a seeded sample of
    `max_examples` (what `select_windows` keeps; the memorization audit asks which windows a job saw)."""
    if max_examples < 1:
        raise ValueError(f"max_examples must be positive, got {max_examples}")
    if count <= max_examples:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, max_examples, replace=False))


def select_windows(windows: Windows, max_examples: int, *, seed: int) -> Windows:
    """At most `max_examples` windows: all of them, or a seeded sample kept in order."""
    indices = sample_window_indices(len(windows), max_examples, seed=seed)
    return windows if len(indices) == len(windows) else windows.take(indices)


def weight_delta(global_weights: Weights, local_weights: Weights) -> Weights:
    """Δ = local − global, by name (the two must have the same names)."""
    if set(global_weights) != set(local_weights):
        raise ValueError(f"weight names differ: {sorted(global_weights)} vs {sorted(local_weights)}")
    return {name: (local_weights[name] - global_weights[name]).astype(np.float32) for name in global_weights}


class TrainingJob:
    """A task's local training over this device's windows, one `train` call per step.

    Args:
        model: the task's model version, loaded in LiteRT.
        global_weights: the version's weights (the starting point and the Δ reference).
        windows: this device's training windows (sampled down to the task's max_examples); None
            for a job that will be `restore`d from a checkpoint before it runs.
        task: the round's task (epochs, learning rate, batch size, clip norm, deadline).
        seed: fixes the sample and the batch order.
        up_to_id: the newest example-store id the windows were made from (restored with the
            windows; 0 when unknown, which marks nothing as trained).

    Raises:
        FedkbError: the task's batch size differs from the model's static one, or no windows.
    """

    def __init__(self, model: TrainableModel, global_weights: Weights, windows: Windows | None, task: RoundTask, *,
                 seed: int, up_to_id: int = 0):
        if task.batch_size != model.batch_size:
            raise FedkbError(f"task batch size {task.batch_size} differs from the model's static {model.batch_size}")
        if task.epochs < 1:
            raise FedkbError(f"task asks for {task.epochs} epochs")
        self.model, self.task, self.seed, self.up_to_id = model, task, seed, up_to_id
        self.global_weights = {k: np.array(v, np.float32, copy=True) for k, v in global_weights.items()}
        self.windows, self._batches = None, []
        if windows is not None:
            self._set_windows(select_windows(windows, task.max_examples, seed=seed))
        self.key = job_key(task)
        model.set_weights(self.global_weights)

    def _set_windows(self, windows: Windows) -> None:
        if len(windows) == 0:
            raise FedkbError("no training windows: the example store is empty")
        self.windows = windows
        self._batches = list(iterate_batches(windows, batch_size=self.model.batch_size, seed=self.seed,
                                             epochs=self.task.epochs))

    # scheduler.Job ---------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        if self.windows is None:
            raise FedkbError("this job has no windows: restore it from its checkpoint first")
        return len(self._batches)

    def run_step(self, step: int) -> float:
        return self.model.train_step(self._batches[step], self.task.learning_rate)

    def snapshot(self) -> dict[str, np.ndarray]:
        tensors = {_W + k: v for k, v in self.model.get_weights().items()}
        tensors.update({_X: self.windows.x, _Y: self.windows.y, _MASK: self.windows.mask,
                        _UP_TO: np.array([self.up_to_id], np.int64)})
        return tensors

    def restore(self, tensors: dict[str, np.ndarray]) -> None:
        weights = {k[len(_W):]: v for k, v in tensors.items() if k.startswith(_W)}
        self._set_windows(Windows(tensors[_X].astype(np.int32), tensors[_Y].astype(np.int32),
                                  tensors[_MASK].astype(np.float32)))
        self.up_to_id = int(tensors[_UP_TO][0]) if _UP_TO in tensors else 0  # 0: a checkpoint that predates it
        self.model.set_weights(weights)

    # Result ----------------------------------------------------------------------------------
    def result(self, losses: tuple[float, ...] | list[float]) -> LocalUpdate:
        """Δ = local − global, clipped to the task's norm (call after the last step)."""
        deltas, norm = clip_by_global_norm(weight_delta(self.global_weights, self.model.get_weights()),
                                           self.task.clip_norm)
        return LocalUpdate(deltas=deltas, num_examples=len(self.windows), update_norm=norm,
                           clip_norm=self.task.clip_norm, mean_loss=float(np.mean(losses)) if losses else float("nan"),
                           steps=len(losses))


def train_local(model: TrainableModel, global_weights: Weights, windows: Windows, task: RoundTask, *,
                seed: int) -> LocalUpdate:
    """Run a whole task without interruption (simulation, benchmarks, tests)."""
    job = TrainingJob(model, global_weights, windows, task, seed=seed)
    losses = [job.run_step(step) for step in range(job.total_steps)]
    return job.result(losses)


def mean_token_loss(model: TrainableModel, windows: Windows) -> float:
    """Mean cross-entropy per target token over `windows` (no weight change)."""
    total, tokens = 0.0, 0.0
    for batch in iterate_batches(windows, batch_size=model.batch_size, seed=0, shuffle=False):
        loss_sum, n = model.evaluate(batch)
        total, tokens = total + loss_sum, tokens + n
    return total / tokens if tokens else float("nan")
