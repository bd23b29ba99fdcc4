"""LiteRT training on the device: weights by name, deterministic jobs, clipping, interruption.

Everything runs the real exported tiny model in the real `ai-edge-litert` interpreter; the only
scripted part is the device state (which conditions hold at each step).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from datasets.tokenizer import load_tokenizer
from edge_runtime.device_state import ScriptedDeviceState
from edge_runtime.eligibility import NOT_CHARGING, NOT_IDLE, EligibilityPolicy
from edge_runtime.litert_model import ModelLayoutError, TrainableModel
from edge_runtime.scheduler import ABANDONED, COMPLETED, INTERRUPTED, CheckpointStore, Scheduler
from edge_runtime.store import ExampleStore
from edge_runtime.trainer import TrainingJob, mean_token_loss, train_local
from fedkb_core.clipping import global_norm
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import INFERENCE_FILE, MANIFEST_FILE, TOKENIZER_FILE, TRAINABLE_FILE
from fedkb_core.protocol import RoundTask
from tests.fixtures_edge import SAMPLE_LINES, edge_model, state  # noqa: F401

NOW = 1_000_000.0


def _task(**changes) -> RoundTask:
    base = RoundTask(round_id=7, model_version=1, learning_rate=0.5, epochs=2, batch_size=4, max_examples=1000,
                     clip_norm=1000.0, deadline=NOW + 3600)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def model(edge_model) -> TrainableModel:
    return TrainableModel(edge_model, num_threads=1)


@pytest.fixture(scope="module")
def global_weights(model):
    return model.get_weights()


@pytest.fixture(scope="module")
def windows(edge_model, tmp_path_factory):
    """This device's training windows, from a real example store."""
    with ExampleStore(tmp_path_factory.mktemp("store") / "examples.sqlite") as store:
        store.import_lines([f"{line} again {i}" for i in range(3) for line in SAMPLE_LINES], source="typed")
        found = store.token_windows(load_tokenizer(edge_model / TOKENIZER_FILE), 6)
    assert len(found) > 20  # enough for several batches of 4 over two epochs
    return found


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


# The LiteRT model -------------------------------------------------------------------------

def test_weights_round_trip_by_manifest_name(model, global_weights):
    assert [s.name for s in model.manifest.weights] == list(global_weights)
    rng = np.random.default_rng(3)
    fresh = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in global_weights.items()}
    try:
        model.set_weights(fresh)
        back = model.get_weights()
        assert _equal(back, fresh)
        back["embedding"][0, 0] += 1.0  # get_weights returns copies, not views of the interpreter
        assert _equal(model.get_weights(), fresh)
    finally:
        model.set_weights(global_weights)
    assert _equal(model.get_weights(), global_weights)


def test_set_weights_changes_what_the_model_computes(model, global_weights, windows):
    before = mean_token_loss(model, windows)
    rng = np.random.default_rng(0)
    try:
        model.set_weights({k: np.zeros_like(v) for k, v in global_weights.items()})
        zero = mean_token_loss(model, windows)
        model.set_weights({k: rng.normal(size=v.shape).astype(np.float32) for k, v in global_weights.items()})
        noisy = mean_token_loss(model, windows)
    finally:
        model.set_weights(global_weights)
    # All-zero weights give uniform logits: the loss is exactly log(vocabulary size).
    assert zero == pytest.approx(np.log(model.manifest.vocab_size), rel=1e-6)
    assert noisy > zero + 0.5  # large random weights predict confidently and wrongly
    assert mean_token_loss(model, windows) == before


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_set_weights_rejects_another_layout(model, global_weights, damage):
    weights = dict(global_weights)
    if damage == "missing":
        weights.pop("lstm_bias")
    elif damage == "extra":
        weights["dense/kernel"] = np.zeros((2, 2), np.float32)
    else:
        weights["lstm_bias"] = np.zeros(weights["lstm_bias"].size + 1, np.float32)
    with pytest.raises(ModelLayoutError):
        model.set_weights(weights)
    assert _equal(model.get_weights(), global_weights)  # nothing was half applied


def _edit_manifest(folder, edit) -> None:
    body = json.loads((folder / MANIFEST_FILE).read_text())
    edit(body)
    (folder / MANIFEST_FILE).write_text(json.dumps(body))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["weights"][0].update(shape=[m["weights"][0]["shape"][0] + 1, m["weights"][0]["shape"][1]]),
     "embedding"),
    (lambda m: m["weights"][0].update(name="renamed"), "differ from the manifest"),
    (lambda m: m["weights"].pop(), "differ from the manifest"),
    (lambda m: m.update(seq_len=m["seq_len"] + 1), "train takes"),
])
def test_loading_checks_the_model_against_its_manifest(edge_model, tmp_path, edit, match):
    folder = shutil.copytree(edge_model, tmp_path / "model")
    _edit_manifest(folder, edit)
    with pytest.raises(ModelLayoutError, match=match):
        TrainableModel(folder)


def test_a_model_without_the_training_signatures_is_refused(edge_model, tmp_path):
    folder = shutil.copytree(edge_model, tmp_path / "model")
    shutil.copyfile(folder / INFERENCE_FILE, folder / TRAINABLE_FILE)  # a valid TFLite file, wrong graph
    with pytest.raises(ModelLayoutError, match="lacks the signatures"):
        TrainableModel(folder)
    (folder / TRAINABLE_FILE).write_bytes(b"not a flatbuffer" * 64)
    with pytest.raises(FedkbError, match="not a TFLite model"):
        TrainableModel(folder)


# Local training ---------------------------------------------------------------------------

def test_training_lowers_the_loss_and_reports_its_work(model, global_weights, windows):
    update = train_local(model, global_weights, windows, _task(), seed=1)
    assert update.num_examples == len(windows)
    assert update.steps == 2 * -(-len(windows) // 4)  # two epochs of batches of 4
    assert np.isfinite(update.mean_loss) and update.update_norm > 0
    model.set_weights({k: global_weights[k] + update.deltas[k] for k in global_weights})
    try:
        assert mean_token_loss(model, windows) < mean_token_loss_at(model, global_weights, windows)
    finally:
        model.set_weights(global_weights)


def mean_token_loss_at(model, weights, windows) -> float:
    current = model.get_weights()
    model.set_weights(weights)
    try:
        return mean_token_loss(model, windows)
    finally:
        model.set_weights(current)


def test_same_seed_same_delta_other_seed_other_delta(model, global_weights, windows):
    first = train_local(model, global_weights, windows, _task(), seed=11)
    again = train_local(model, global_weights, windows, _task(), seed=11)
    other = train_local(model, global_weights, windows, _task(), seed=12)
    assert _equal(first.deltas, again.deltas) and first.update_norm == again.update_norm
    assert not any(np.array_equal(first.deltas[k], other.deltas[k]) for k in first.deltas)


def test_max_examples_samples_by_seed(model, global_weights, windows):
    task = _task(max_examples=8, epochs=1)
    update = train_local(model, global_weights, windows, task, seed=5)
    assert update.num_examples == 8 and update.steps == 2
    assert _equal(update.deltas, train_local(model, global_weights, windows, task, seed=5).deltas)


def test_delta_is_clipped_and_the_norm_is_the_unclipped_one(model, global_weights, windows):
    free = train_local(model, global_weights, windows, _task(clip_norm=1e6), seed=2)
    assert free.update_norm == pytest.approx(global_norm(free.deltas), rel=1e-9)  # not clipped at all
    clip = free.update_norm / 4
    clipped = train_local(model, global_weights, windows, _task(clip_norm=clip), seed=2)
    assert clipped.clip_norm == clip
    assert clipped.update_norm == pytest.approx(free.update_norm, rel=1e-9)
    assert global_norm(clipped.deltas) == pytest.approx(clip, rel=1e-5)
    for name, delta in free.deltas.items():  # scaled, not truncated: the direction is kept
        np.testing.assert_allclose(clipped.deltas[name], delta * np.float32(0.25), rtol=1e-5, atol=1e-8)
        assert clipped.deltas[name].dtype == np.float32


def test_job_refuses_a_task_it_cannot_run(model, global_weights, windows):
    with pytest.raises(FedkbError, match="batch size"):
        TrainingJob(model, global_weights, windows, _task(batch_size=8), seed=0)
    with pytest.raises(FedkbError, match="no training windows"):
        TrainingJob(model, global_weights, windows.take(np.arange(0)), _task(), seed=0)


# Scheduling: interruption, resume, deadlines ---------------------------------------------

def _scheduler(tmp_path, provider, clock=lambda: NOW) -> Scheduler:
    return Scheduler(state=provider, policy=EligibilityPolicy(),
                     checkpoints=CheckpointStore(tmp_path / "job.safetensors"), clock=clock)


def _states(ok_steps: int, dropped):
    return ScriptedDeviceState.sequence([state()] * ok_steps + [dropped])


class _OneSecondSteps:
    """A job whose every step takes one second of a simulated clock (`now[0]`), so the device
    state and the deadline can change between two given steps, however often the scheduler looks."""

    def __init__(self, job: TrainingJob, now: list[float]):
        self.job, self.now, self.key = job, now, job.key

    @property
    def total_steps(self) -> int:
        return self.job.total_steps

    def run_step(self, step: int) -> float:
        loss = self.job.run_step(step)
        self.now[0] += 1.0
        return loss

    def snapshot(self):
        return self.job.snapshot()

    def restore(self, tensors) -> None:
        self.job.restore(tensors)


def test_condition_drop_stops_the_job_before_the_next_step(model, global_weights, windows, tmp_path):
    now = [0.0]
    provider = ScriptedDeviceState([(0, state()), (4.5, state(charging=False))], clock=lambda: now[0])
    scheduler = _scheduler(tmp_path, provider)
    outcome = scheduler.run(_OneSecondSteps(TrainingJob(model, global_weights, windows, _task(), seed=3), now))
    assert outcome.status == INTERRUPTED and outcome.reasons == (NOT_CHARGING,)
    # The charger went away during the fifth step (seconds 4 to 5): the sixth never started.
    assert (outcome.next_step, outcome.steps_run) == (5, 5)
    assert len(outcome.losses) == 5
    checkpoint = scheduler.pending()
    assert checkpoint is not None and checkpoint.next_step == 5 and checkpoint.losses == outcome.losses


def test_interrupted_then_resumed_job_gives_exactly_the_uninterrupted_delta(edge_model, model, global_weights, windows,
                                                                             tmp_path):
    task = _task()
    straight = train_local(model, global_weights, windows, task, seed=4)

    # Interrupted twice (before step 3, then before step 13), each time resumed in a fresh
    # interpreter as after a restart of the device process, then run to the end.
    first = TrainingJob(model, global_weights, windows, task, seed=4)
    outcome = _scheduler(tmp_path, _states(3, state(idle=False))).run(first)
    assert (outcome.status, outcome.next_step, outcome.reasons) == (INTERRUPTED, 3, (NOT_IDLE,))
    fresh = TrainableModel(edge_model)
    second = TrainingJob(fresh, fresh.get_weights(), None, task, seed=4)  # windows come from the checkpoint
    outcome = _scheduler(tmp_path, _states(10, state(charging=False))).run(second)
    assert (outcome.status, outcome.resumed_from, outcome.next_step) == (INTERRUPTED, 3, 13)
    assert outcome.reasons == (NOT_CHARGING,)
    fresh = TrainableModel(edge_model)
    job = TrainingJob(fresh, fresh.get_weights(), None, task, seed=4)
    scheduler = _scheduler(tmp_path, ScriptedDeviceState(state()))
    outcome = scheduler.run(job)
    assert outcome.status == COMPLETED and outcome.resumed_from == 13
    assert outcome.steps_run == straight.steps - 13 and len(outcome.losses) == straight.steps
    resumed = job.result(outcome.losses)
    assert _equal(resumed.deltas, straight.deltas)
    assert (resumed.update_norm, resumed.num_examples, resumed.mean_loss) == (
        straight.update_norm, straight.num_examples, straight.mean_loss)
    assert scheduler.pending() is None and not (tmp_path / "job.safetensors").exists()


def test_a_job_past_its_deadline_is_abandoned(model, global_weights, windows, tmp_path):
    scheduler = _scheduler(tmp_path, ScriptedDeviceState(state()), clock=lambda: NOW + 3600)
    outcome = scheduler.run(TrainingJob(model, global_weights, windows, _task(), seed=0))
    assert (outcome.status, outcome.steps_run, outcome.reasons) == (ABANDONED, 0, ("expired",))


def test_the_deadline_passing_mid_job_abandons_it_cleanly(model, global_weights, windows, tmp_path):
    now = [0.0]
    # One second per step; the deadline falls during the fifth step.
    scheduler = _scheduler(tmp_path, ScriptedDeviceState(state()), clock=lambda: NOW + now[0])
    job = _OneSecondSteps(TrainingJob(model, global_weights, windows, _task(deadline=NOW + 4.5), seed=0), now)
    outcome = scheduler.run(job)
    assert (outcome.status, outcome.next_step, outcome.reasons) == (ABANDONED, 5, ("expired",))
    assert not (tmp_path / "job.safetensors").exists()


def test_an_interrupted_job_whose_deadline_passed_is_abandoned_not_resumed(edge_model, model, global_weights,
                                                                          windows, tmp_path):
    now = [NOW]
    task = _task(deadline=NOW + 60)
    outcome = _scheduler(tmp_path, _states(2, state(charging=False)), clock=lambda: now[0]).run(
        TrainingJob(model, global_weights, windows, task, seed=0))
    assert outcome.status == INTERRUPTED and (tmp_path / "job.safetensors").exists()

    now[0] = NOW + 61  # the next eligible window comes after the round's deadline
    fresh = TrainableModel(edge_model)
    job = TrainingJob(fresh, fresh.get_weights(), None, task, seed=0)  # a job that expects to resume
    outcome = _scheduler(tmp_path, ScriptedDeviceState(state()), clock=lambda: now[0]).run(job)
    assert (outcome.status, outcome.steps_run, outcome.reasons) == (ABANDONED, 0, ("expired",))
    assert not (tmp_path / "job.safetensors").exists()


def test_a_checkpoint_of_another_round_is_dropped_not_resumed(model, global_weights, windows, tmp_path):
    _scheduler(tmp_path, _states(2, state(charging=False))).run(
        TrainingJob(model, global_weights, windows, _task(round_id=1), seed=0))
    scheduler = _scheduler(tmp_path, ScriptedDeviceState(state()))
    assert scheduler.may_start(new_examples=0)  # pending work waives the new-examples rule
    outcome = scheduler.run(TrainingJob(model, global_weights, windows, _task(round_id=2, epochs=1), seed=0))
    assert outcome.status == COMPLETED and outcome.resumed_from is None
    assert outcome.steps_run == -(-len(windows) // 4)
    assert not scheduler.may_start(new_examples=0)  # nothing pending any more, and no new text


def test_a_torn_checkpoint_is_discarded(tmp_path):
    (tmp_path / "job.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    scheduler = _scheduler(tmp_path, ScriptedDeviceState(state()))
    assert scheduler.pending() is None and not (tmp_path / "job.safetensors").exists()

