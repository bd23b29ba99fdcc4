"""One emulated phone: the edge runtime's own `Device`, fed one client's prepared text.

Each emulated phone is a real `edge_runtime.device.Device` with its own home folder
(credentials, job checkpoint, outbox) running its own cycle, in two halves: the selection half
(`Device.request_task`: eligibility, the outbox, a newer model version, the check-in) in the
fleet's process, and the work half (`Device.run_task`: fetch and verify the task's version over
HTTP into the edge runtime's `ModelStore`, train with LiteRT under the scheduler, clip, encode,
keep the update in the outbox, upload it) in an executor worker, through `run_device_job`.
With secure aggregation the work half is the phone's input step of its round instead
(`Device.secagg_step`: its status, the inbox, training, encoding, masking, the upload), run by a
new `Device` over the phone's home: everything the earlier stages left is on that disk.
Nothing here imports TensorFlow, and nothing reads the server's files.

What is emulated:
* the example source: a client's prepared token stream (`TokenStreamExamples`) stands in for the
  typed messages in SQLite, so the device trains on exactly the windows the TFF reference gets
  (`client_windows`);
* the device state: its daily pattern on the simulated clock (`FleetClockState`); during a job,
  one slice of the simulated job duration per training step (`JobClockState`: the scheduler
  reads the state once before each step), so a phone whose night ends mid-job drops out;
* storage: each phone keeps its own model store in its home, so it downloads what a phone
  would (its traffic is counted per job, `JobResult.bytes_downloaded`), but identical files are
  hard links into one pool (`simulation.shared_files`), so disk use stays O(versions) rather
  than O(devices); the devices of a worker process share one warm trainable interpreter, loaded
  once per version.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path

import numpy as np
import requests

from datasets.windows import Windows, empty_windows, make_windows
from edge_runtime.client import RetryPolicy, ServerClient, ServerUnavailable
from edge_runtime.device import CycleReport, Device, DeviceConfig
from edge_runtime.device_state import ScriptedDeviceState
from edge_runtime.eligibility import EligibilityPolicy
from edge_runtime.litert_model import TrainableCache
from edge_runtime.model_store import ModelStore
from edge_runtime.trainer import select_windows
from fedkb_core.protocol import DeviceState, RoundTask
from simulation.availability import AvailabilityConfig, DailyPattern
from simulation.shared_files import share

# The edge runtime's production conditions (idle, charging, unmetered, battery >= 20 %); the
# new-examples rule does not apply, as an emulated device's text is all there from the start.
POLICY = EligibilityPolicy(min_new_examples=0)
ALWAYS_ELIGIBLE = DeviceState(idle=True, charging=True, unmetered=True, battery=100.0)


def client_windows(tokens: np.ndarray, *, seq_len: int, max_examples: int, seed: int) -> Windows:
    """The windows a device trains on in one round: what `TokenStreamExamples` gives the device,
    sampled as its `TrainingJob` samples them (the TFF reference trains on these)."""
    return select_windows(make_windows(tokens, seq_len), max_examples, seed=seed)


def job_steps(tokens: np.ndarray, *, seq_len: int, task: RoundTask) -> int:
    """How many training steps the device's job for `task` will have."""
    windows = min(len(make_windows(tokens, seq_len)), task.max_examples) if len(tokens) else 0
    return task.epochs * math.ceil(windows / task.batch_size)


class TokenStreamExamples:
    """An `ExampleSource` over one client's prepared token stream, seen as one message.

    The stream was tokenized with the tokenizer the model was exported with (the fleet checks
    the manifest's tokenizer sha256 against the data's), so `token_windows` cuts it directly.
    """

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens)
        self._trained_up_to = 0

    def enforce_retention(self) -> int:
        return 0  # a client's text is the data set's: nothing ages out during a simulation

    def last_id(self) -> int:
        return 1 if len(self.tokens) else 0

    def new_examples(self) -> int:
        return self.last_id() - min(self._trained_up_to, self.last_id())

    def token_windows(self, tokenizer, seq_len: int, *, up_to_id: int | None = None) -> Windows:
        if self.last_id() == 0 or (up_to_id is not None and up_to_id < 1):
            return empty_windows(seq_len)
        return make_windows(self.tokens, seq_len)

    def mark_trained(self, up_to_id: int) -> None:
        self._trained_up_to = max(self._trained_up_to, int(up_to_id))

    def delete_all(self) -> int:
        deleted, self.tokens = self.last_id(), self.tokens[:0]
        return deleted

    def close(self) -> None:
        pass


class SimulatedClock:
    """The fleet's simulated UTC time (seconds), advanced round by round."""

    def __init__(self, now: float):
        self.now = now


class FleetClockState:
    """A device's state at the fleet's simulated time (the selection half of a cycle)."""

    def __init__(self, pattern: DailyPattern, clock: SimulatedClock, availability: AvailabilityConfig):
        self.pattern, self.clock, self.availability = pattern, clock, availability

    def current(self) -> DeviceState:
        return self.pattern.state_at(self.clock.now, self.availability)


class JobClockState:
    """A device's state as its job advances: read k is at `start + k · seconds / steps`.

    The scheduler reads the state once before each training step, so the job spans `seconds`
    of simulated time whatever the real speed of the machine.
    """

    def __init__(self, pattern: DailyPattern, availability: AvailabilityConfig, *, start: float, seconds: float,
                 steps: int):
        self.pattern, self.availability, self.start = pattern, availability, start
        self.per_step = seconds / max(steps, 1)
        self._reads = itertools.count()

    def current(self) -> DeviceState:
        return self.pattern.state_at(self.start + next(self._reads) * self.per_step, self.availability)


def emulated_device(server_url: str, home: Path, tokens: np.ndarray, *, state, models: ModelStore | None = None,
                    session: requests.Session | None = None) -> Device:
    """A phone's `Device` for the selection half of its cycle, in the fleet's process: its home,
    its client's text, its own model store in its home (unless `models` is given)."""
    return Device(DeviceConfig(server_url=server_url, home=Path(home), policy=POLICY, suggestions=False), state=state,
                  client=ServerClient(server_url, session=session), examples=TokenStreamExamples(tokens), models=models)


@dataclasses.dataclass(frozen=True)
class DeviceJob:
    """One selected device's task; plain data so it pickles to a worker process."""

    server_url: str
    home: str  # the device's home folder (its credentials are there since enrollment)
    task: dict  # RoundTask as JSON
    tokens: np.ndarray  # this client's training token stream (stays "on the device")
    files_pool: str  # the folder of model files the phones' stores link to (`simulation.shared_files`)
    seed: int  # the training seed of this client in this round (the TFF reference uses the same)
    num_threads: int = 1
    pattern: DailyPattern | None = None  # None: the device stays eligible throughout
    availability: AvailabilityConfig = AvailabilityConfig()
    sim_start: float = 0.0  # simulated UTC seconds when the job starts
    job_seconds: float = 600.0  # simulated duration of the whole job
    steps: int = 1  # the job's training steps (`job_steps`), to spread job_seconds over
    policy: EligibilityPolicy = POLICY
    # Secure aggregation: the job is the device's step of its round's input stage (`Device.secagg_step`:
    # the status, the inbox, training, encoding, masking, the upload), not `run_task`.
    secagg: bool = False


@dataclasses.dataclass(frozen=True)
class JobResult:
    device_id: str | None
    status: str  # accepted | duplicate | dropped (state changed mid-job) | late | rejected:<code> | failed:<why> | no_data
    num_examples: int = 0
    update_norm: float = 0.0
    upload_bytes: int = 0
    train_seconds: float = 0.0
    mean_loss: float = float("nan")
    steps: int = 0
    # What the job moved over HTTP (`edge_runtime.client.Traffic`): model download and upload.
    requests: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    # Secure aggregation: the cycle's action and reason (e.g. secagg_dropped, too_few_shared), the
    # round's stage after it, and the CPU ms the device spent opening the inbox and masking, and
    # encoding its update onto the round's grid.
    action: str | None = None
    reason: str | None = None
    stage: str | None = None
    secagg_ms: float = 0.0
    encode_ms: float = 0.0


# What a device's cycle report means for the fleet's participation counts.
_STATUS = {"accepted": "accepted", "duplicate": "duplicate", "interrupted": "dropped", "abandoned": "dropped",
           "dropped": "late", "no_data": "no_data", "secagg_dropped": "dropped", "secagg_refused": "dropped"}

# Per process: the warm interpreter its devices share.
_trainables: dict[int, TrainableCache] = {}


def result_of(device_id: str | None, report: CycleReport, seconds: float = 0.0) -> JobResult:
    status = _STATUS.get(report.action)
    if report.action == "secagg_dropped" and report.reasons == ("missed_input",):
        status = "late"  # the input stage closed at the goal before this phone's turn: over-selected
    if status is None:
        why = report.message or ",".join(report.reasons)
        status = f"rejected:{why}" if report.action == "rejected" else f"failed:{report.action}: {why}"
    return JobResult(device_id, status, report.num_examples, report.update_norm or 0.0, report.upload_bytes,
                     seconds, report.mean_loss if report.mean_loss is not None else float("nan"), report.steps,
                     action=report.action, reason=report.reasons[0] if report.reasons else None, stage=report.stage,
                     secagg_ms=report.secagg_ms or 0.0, encode_ms=report.encode_ms or 0.0)


def run_device_job(job: DeviceJob) -> JobResult:
    """The work half of the device's cycle for its task. Errors become a result, never an
    exception across processes (a device failing is data for the report, not a crash of the fleet)."""
    task = RoundTask.from_json(job.task)
    state = (JobClockState(job.pattern, job.availability, start=job.sim_start, seconds=job.job_seconds,
                           steps=job.steps) if job.pattern is not None else ScriptedDeviceState(ALWAYS_ELIGIBLE))
    client = ServerClient(job.server_url, retry=RetryPolicy(max_attempts=5, base_delay=0.2, max_delay=5.0),
                          timeout=60.0, seed=job.seed)
    device = None
    try:
        # The device adds the round id to its configured seed: give it the client's seed for this round.
        config = DeviceConfig(server_url=job.server_url, home=Path(job.home), policy=job.policy,
                              num_threads=job.num_threads, seed=job.seed - task.round_id, suggestions=False)
        device = Device(config, state=state, client=client, examples=TokenStreamExamples(job.tokens),
                        trainables=_trainables.setdefault(job.num_threads, TrainableCache(num_threads=job.num_threads)))
        started = time.monotonic()
        report = device.secagg_step() if job.secagg else device.run_task(task)
        if report is None:  # the device holds no SecAgg round (it dropped out earlier)
            report = CycleReport("secagg_dropped", ("no_round_held",), round_id=task.round_id)
        result = result_of(device.device_id, report, time.monotonic() - started)
    except ServerUnavailable as err:
        result = JobResult(device.device_id if device else None, f"failed:server unavailable: {err}")
    except Exception as err:  # noqa: BLE001 (see docstring)
        result = JobResult(device.device_id if device else None, f"failed:{type(err).__name__}: {err}")
    finally:
        if device is not None:
            share(device.models.root, job.files_pool)
            device.close()
        else:
            client.close()
    moved = client.traffic
    return dataclasses.replace(result, requests=moved.requests, bytes_uploaded=moved.bytes_sent,
                               bytes_downloaded=moved.bytes_received)

