"""One emulated device's work in one round, run inside an executor worker process.

Each emulated phone runs the real edge runtime, end to end: `ServerClient` fetches the task's
model version over HTTP and `ModelStore` verifies every file against the manifest before it is
used; `TrainingJob` trains with the LiteRT `train` signature and clips Δ; the `Scheduler` runs it
step by step and reads the device's state before every step, so a phone whose simulated night
ends mid-job (taken off the charger, picked up, off Wi-Fi) stops there, as a real one would; the
client uploads the safetensors update with retries and its bearer token. Nothing here imports
TensorFlow.

What is emulated: the device state (its daily pattern on the simulated clock, one simulated
job-duration slice per training step) and the example store, whose role the client's prepared
training stream plays, so that the TFF reference trains on exactly the same windows. Model
versions are cached once per worker process rather than once per phone, to keep disk use
O(workers) instead of O(devices).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from datasets.windows import Windows, make_windows
from edge_runtime.client import Credentials, RetryPolicy, ServerClient, ServerUnavailable
from edge_runtime.device_state import ScriptedDeviceState
from edge_runtime.eligibility import EligibilityPolicy
from edge_runtime.litert_model import TrainableModel, Weights
from edge_runtime.model_store import ModelStore
from edge_runtime.scheduler import COMPLETED, CheckpointStore, Scheduler
from edge_runtime.trainer import TrainingJob, select_windows
from fedkb_core.protocol import DeviceState, RoundTask
from fedkb_core.wire import UpdateMetadata, encode_update
from simulation.availability import AvailabilityConfig, DailyPattern

ALWAYS_ELIGIBLE = DeviceState(idle=True, charging=True, unmetered=True, battery=100.0)


@dataclasses.dataclass(frozen=True)
class DeviceJob:
    """Everything a worker needs; plain data so it pickles to another process."""

    server_url: str
    device_id: str
    token: str
    task: dict  # RoundTask as JSON
    tokens: np.ndarray  # this client's training token stream (stays "on the device")
    cache_dir: str  # where this worker keeps downloaded model versions
    seed: int
    num_threads: int = 1
    pattern: DailyPattern | None = None  # None: the device stays eligible throughout
    availability: AvailabilityConfig = AvailabilityConfig()
    sim_start: float = 0.0  # simulated UTC seconds when the job starts
    job_seconds: float = 600.0  # simulated duration of the whole job
    policy: EligibilityPolicy = EligibilityPolicy(min_new_examples=0)


@dataclasses.dataclass(frozen=True)
class JobResult:
    device_id: str
    status: str  # accepted | duplicate | dropped (state changed mid-job) | late | rejected:<code> | failed:<why> | no_data
    num_examples: int = 0
    update_norm: float = 0.0
    upload_bytes: int = 0
    train_seconds: float = 0.0
    mean_loss: float = float("nan")
    steps: int = 0


_loaded: dict[int, tuple[TrainableModel, Weights]] = {}  # per worker process: the current version's model


def client_windows(tokens: np.ndarray, *, seq_len: int, max_examples: int, seed: int) -> Windows:
    """The windows a device trains on in one round (the TFF reference uses the same)."""
    return select_windows(make_windows(tokens, seq_len), max_examples, seed=seed)


def _model(store: ModelStore, client: ServerClient, version: int, num_threads: int) -> tuple[TrainableModel, Weights]:
    """The version's trainable model and global weights, fetched and verified on first use."""
    if version not in _loaded:
        if not store.has_version(version):
            store.fetch(client, version)
        model = TrainableModel(store.version_dir(version), num_threads=num_threads)
        _loaded.clear()  # one version at a time per worker
        _loaded[version] = (model, model.get_weights())
    return _loaded[version]


def _day_state(job: DeviceJob, total_steps: int) -> ScriptedDeviceState:
    """The device's state as the job advances: step k is read at sim_start + k · (job / steps)."""
    if job.pattern is None:
        return ScriptedDeviceState(ALWAYS_ELIGIBLE)
    per_step = job.job_seconds / max(total_steps, 1)
    reads = iter(range(1 << 62))  # the scheduler reads the state once before each step
    return ScriptedDeviceState(lambda _t: job.pattern.state_at(job.sim_start + next(reads) * per_step,
                                                               job.availability))


def run_device_job(job: DeviceJob) -> JobResult:
    """Fetch, train under the scheduler, clip, upload. Errors become a result, never an exception
    across processes (a device failing is data for the report, not a crash of the fleet)."""
    task = RoundTask.from_json(job.task)
    cache = Path(job.cache_dir)
    client = ServerClient(job.server_url, credentials=Credentials(job.device_id, job.token), seed=job.seed,
                          retry=RetryPolicy(max_attempts=5, base_delay=0.2, max_delay=5.0), timeout=60.0)
    try:
        store = ModelStore(cache / f"worker-{os.getpid()}")
        model, global_weights = _model(store, client, task.model_version, job.num_threads)
        windows = client_windows(job.tokens, seq_len=model.seq_len, max_examples=task.max_examples, seed=job.seed)
        if len(windows) == 0:
            return JobResult(job.device_id, "no_data")
        training = TrainingJob(model, global_weights, windows, task, seed=job.seed)
        checkpoints = CheckpointStore(cache / "jobs" / f"{job.device_id}.safetensors")
        scheduler = Scheduler(state=_day_state(job, training.total_steps), policy=job.policy, checkpoints=checkpoints)
        started = time.monotonic()
        outcome = scheduler.run(training)
        seconds = time.monotonic() - started
        if outcome.status != COMPLETED:
            checkpoints.clear()  # the round will be over before this phone's next window
            return JobResult(job.device_id, "dropped", steps=outcome.steps_run, train_seconds=seconds)
        update = training.result(outcome.losses)
        body = encode_update(update.deltas, UpdateMetadata(
            round_id=task.round_id, model_version=task.model_version, device_id=job.device_id,
            num_examples=update.num_examples, clip_norm=update.clip_norm, update_norm=update.update_norm,
            encoding=task.encoding))
        result = client.upload(task.round_id, body)
        status = {"accepted": "accepted", "duplicate": "duplicate", "dropped": "late"}.get(
            result.status, f"rejected:{result.code}")
        return JobResult(job.device_id, status, update.num_examples, update.update_norm, len(body), seconds,
                         update.mean_loss, update.steps)
    except ServerUnavailable as err:
        return JobResult(job.device_id, f"failed:server unavailable: {err}")
    except Exception as err:  # noqa: BLE001 (see docstring)
        return JobResult(job.device_id, f"failed:{type(err).__name__}: {err}")
    finally:
        client.close()
