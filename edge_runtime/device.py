"""The device loop: one phone's federated learning client, end to end.

Each cycle follows the client protocol of production FL (Bonawitz et al., 2019,
https://arxiv.org/abs/1902.01046, §2–3):

1. apply the example store's retention policy;
2. check eligibility locally (idle, charging, unmetered, battery, enough new text). An ineligible
   device stops here and sends nothing at all;
3. retry any update still waiting in the outbox (an earlier upload the network swallowed); a
   cycle that sends one does nothing else;
4. check in with the server, which answers with a task or a retry-after (pace steering);
   at check-in, a device that suggests fetches and verifies a newer version's inference model if
   there is one (one that only trains needs no version until it has a task);
5. fetch what the task's version needs to train and the device does not hold yet
   (`ModelStore.fetch(files=...)`), and run the task's job under the scheduler (interruptible,
   checkpointed, resumable);
6. clip Δ, encode it (safetensors), keep it in the outbox, upload it, and clear the outbox once
   the server has it (or says it is too late).

A task with encoding `secagg` (secure aggregation, docs/secure_aggregation.md) runs over several
cycles instead (`edge_runtime.secagg_job`): the check-in's cycle advertises the round's keys, and
while the device holds such a round every cycle, once the device is eligible and its outbox is
empty, is one step of the round (the server's status: wait, share, train-mask-upload, unmask,
done or dropped) instead of a check-in; the loop comes back after the status's retry-after.

A long-running device survives what goes wrong in a cycle: an unreachable server, a refusal
(4xx), a reply that is not what the protocol says, a task outside the device's own bounds
(`bounds.TaskBounds`: refused before any work, "refused"), an update that came out non-finite
(never uploaded) or a rejected model is logged in one line, reported as the cycle's outcome and
retried after the poll interval; the server's retry-after is clamped to the device's bounds. A 401 is reported as such and never answered by enrolling again
behind the operator's back: the server no longer knows this device (its state was reset, or
the token revoked), and only the operator can decide to start over with a new identity.

The device also serves suggestions (`suggest`) from whichever version is current: its
`LiveSuggester` is a model-store listener, so suggestions follow every swap the cycles make.

Model versions are accepted only when signed by a trusted key (`fedkb_core.signing`): the keys
in `DeviceConfig.trusted_keys` (the app ships them), else the server's key pinned at
enrollment into `model_signing_keys.pem` and never replaced by the server afterwards.

Files under `home`: `credentials.json` (0600), `model_signing_keys.pem` (the pinned key),
`examples.sqlite` (the typed text; never sent), `models/` (verified versions), `job.safetensors`
(an interrupted job), `outbox/` (an update waiting to be uploaded), `secagg/` (0700: a secure
aggregation round's keys, shares, task and encoded input; deleted with the round).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datasets.tokenizer import load_tokenizer
from edge_runtime.bounds import DownloadLimits, TaskBounds, TaskRefused, check_steps, check_task, clamp_retry_after
from edge_runtime.client import Credentials, ServerClient, ServerError, ServerUnavailable, UploadResult
from edge_runtime.cycle_report import CycleReport
from edge_runtime.device_state import DeviceStateProvider
from edge_runtime.eligibility import EligibilityPolicy
from edge_runtime.litert_model import TrainableCache
from edge_runtime.model_store import ModelRejected, ModelStore
from edge_runtime.scheduler import ABANDONED, COMPLETED, CheckpointStore, JobOutcome, Scheduler
from edge_runtime.secagg_job import SecAggRounds
from edge_runtime.store import ExampleSource, ExampleStore, RetentionPolicy
from edge_runtime.suggester import LiveSuggester
from edge_runtime.trainer import LocalUpdate, TrainingJob, job_key
from edge_runtime.version_check import SUGGESTION_FILES, TRAINING_FILES
from fedkb_core.durable import atomic_write, atomic_write_json
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import TOKENIZER_FILE, Manifest
from fedkb_core.protocol import RoundTask
from fedkb_core.signing import TrustedKeys
from fedkb_core.update_encoding import SECAGG
from fedkb_core.wire import UpdateMetadata, encode_update

log = logging.getLogger(__name__)

CREDENTIALS_FILE = "credentials.json"
PINNED_KEYS_FILE = "model_signing_keys.pem"


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """One device's settings (`fedkb device` flags)."""

    server_url: str
    home: Path
    policy: EligibilityPolicy = EligibilityPolicy()
    retention: RetentionPolicy = RetentionPolicy()
    num_threads: int = 1  # a phone trains on one or two little cores
    seed: int | None = None  # None: derived from the device id and the round
    poll_seconds: float = 60.0  # how often an ineligible device looks again
    platform: str = "linux"
    suggestions: bool = True  # load the inference model and serve `suggest` (False: a client that only trains)
    downloads: DownloadLimits = DownloadLimits()  # byte budgets for what the server sends
    task_bounds: TaskBounds = TaskBounds()  # the tasks and waits this device accepts
    trusted_keys: TrustedKeys | None = None  # model signing keys; None: pin the server's at enrollment


class Device:
    """A federated learning client with its own home folder.

    Args:
        config: the device's settings.
        state: where idle / charging / unmetered / battery come from.
        client: the server client (default: one for `config.server_url`).
        clock: unix seconds (round deadlines).
        examples: where the training text comes from (default: `home/examples.sqlite`).
        models: the model versions (default: a store in `home/models`); devices of one process
            may share one (an emulated fleet), with `config.suggestions` off.
        trainables: keeps the trainable interpreter warm between jobs (default: this device's own).
    """

    def __init__(self, config: DeviceConfig, *, state: DeviceStateProvider, client: ServerClient | None = None,
                 clock: Callable[[], float] = time.time, examples: ExampleSource | None = None,
                 models: ModelStore | None = None, trainables: TrainableCache | None = None):
        self.config, self.state, self._clock = config, state, clock
        self.home = Path(config.home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.client = client or ServerClient(config.server_url, limits=config.downloads)
        self.client.credentials = self.client.credentials or load_credentials(self.home)
        self.examples: ExampleSource = examples or ExampleStore(self.home / "examples.sqlite",
                                                                retention=config.retention, clock=clock)
        self.models = models or ModelStore(self.home / "models", limits=config.downloads)
        if self.models.trusted_keys is None:
            self.models.trusted_keys = config.trusted_keys or load_pinned_keys(self.home)
        self.trainables = trainables or TrainableCache(num_threads=config.num_threads)
        self.scheduler = Scheduler(state=state, policy=config.policy,
                                   checkpoints=CheckpointStore(self.home / "job.safetensors"), clock=clock)
        self.outbox = self.home / "outbox"
        self.secagg = SecAggRounds(self)
        self.suggester = LiveSuggester(num_threads=config.num_threads)
        if config.suggestions:
            if self.models.current_dir() is not None:
                self._follow_model(self.models.current_dir())
            self.models.add_listener(self._follow_model)

    def close(self) -> None:
        self.examples.close()
        self.client.close()

    # Setup -----------------------------------------------------------------------------------
    @property
    def device_id(self) -> str | None:
        return self.client.credentials.device_id if self.client.credentials else None

    def ensure_enrolled(self, enrollment_secret: str | None) -> Credentials:
        """Enroll on first run and keep the credentials in the home folder.

        Raises:
            FedkbError: not enrolled yet and no secret given.
            ServerError: the server refused the secret.
        """
        if self.client.credentials is not None:
            self._ensure_trusted_keys()
            return self.client.credentials
        if not enrollment_secret:
            raise FedkbError("this device is not enrolled: pass --enrollment-secret-file or set FEDKB_ENROLLMENT_SECRET")
        credentials = self.client.enroll(enrollment_secret, platform=self.config.platform)
        save_credentials(self.home, credentials)
        log.info("enrolled as device %s", credentials.device_id)
        self._ensure_trusted_keys()
        return credentials

    def _ensure_trusted_keys(self) -> None:
        """Pin the server's model signing key if no key is configured or pinned yet (trust on first
        use, at enrollment); once pinned, the server cannot replace it."""
        if self.models.trusted_keys is not None:
            return
        pem = self.client.signing_key()
        keys = TrustedKeys.from_pem(pem, where="the server's model signing key")
        atomic_write(self.home / PINNED_KEYS_FILE, keys.to_pem())
        self.models.trusted_keys = keys
        log.info("pinned the server's model signing key %s", ", ".join(keys.key_ids))

    def import_text(self, path: Path) -> int:
        """Add a text file's lines (one message per line) to the example store."""
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                added = self.examples.import_lines(f, source=str(path.resolve()))
        except (OSError, UnicodeDecodeError) as err:
            raise FedkbError(f"{path}: cannot read the text file ({err})") from None
        log.info("imported %d new messages from %s (%d stored)", added, path, self.examples.count())
        return added

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """The top-k next words after `text` from the current model ([] until one is installed).

        Safe to call from the UI thread while `run` cycles on another: a model swap builds the
        new version's suggester before switching, so suggestions never go blank.
        """
        return self.suggester.suggest(text, k=k)

    def _follow_model(self, model_dir: Path, manifest: Manifest | None = None) -> None:
        """Model-store listener: serve suggestions from the version just made current. A version
        whose inference model will not load keeps the old suggestions rather than stopping the
        device (training, which does not need it, goes on)."""
        try:
            self.suggester.swap(model_dir, manifest)
        except FedkbError as err:
            log.error("suggestions stay on model version %s: %s", self.suggester.version, err)

    def forget_user_data(self) -> None:
        """Delete the typed text and everything derived from it (job checkpoint, pending update, a
        secure aggregation round's encoded input: the device leaves that round)."""
        held = self.secagg.held_round()
        if held is not None:
            self.secagg.forget(held)
        self.examples.delete_all()
        self.scheduler.checkpoints.clear()
        for f in self.outbox.glob("*") if self.outbox.is_dir() else []:
            f.unlink(missing_ok=True)

    # One cycle -------------------------------------------------------------------------------
    def run_once(self) -> CycleReport:
        """One pass of the client protocol (see the module docstring)."""
        task = self.request_task()
        return task if isinstance(task, CycleReport) else self.run_task(task)

    def request_task(self) -> RoundTask | CycleReport:
        """Steps 1–4 of a cycle: the task the server hands out, or the cycle's report when
        there is nothing to train (ineligible, an outbox upload was the work, wait)."""
        self.examples.enforce_retention()
        verdict = self.scheduler.may_start(new_examples=self.examples.new_examples())
        if not self.scheduler.can_run():
            return CycleReport("ineligible", verdict.reasons)  # not a byte goes out

        flushed = self._flush_outbox()
        if flushed is not None:
            # A kept update went out (or failed again): that is this cycle's work. Going on would
            # report a check-in instead and judge "new examples" by a count the upload just reset.
            return flushed
        stepped = self.secagg_step()  # a secure aggregation round under way needs no new examples
        if stepped is not None:
            return stepped
        if not verdict:  # too few new examples
            return CycleReport("ineligible", verdict.reasons)

        self._ensure_trusted_keys()  # never fetch a version without a key to check it against
        if self.config.suggestions:  # the keyboard wants the newest model; training waits for a task
            try:
                self.models.update_if_newer(self.client, SUGGESTION_FILES)
            except ModelRejected as err:
                log.warning("%s", err)
        answer = self.client.checkin(self.state.current(), self.models.current_version)
        if answer.action != "train":
            self.scheduler.abandon_unless(None)
            reason = answer.reason
            if reason is not None and not (reason.isidentifier() and reason.isascii() and len(reason) <= 64):
                reason = "unknown"  # a server-given string goes into logs and reports: only a plain code
            return CycleReport("wait", (reason,) if reason else (), retry_after=clamp_retry_after(answer.retry_after,
                                                                                self.config.task_bounds))
        return answer.task

    def run_task(self, task: RoundTask) -> CycleReport:
        """Steps 5–6 of a cycle for a task the server handed out: train, clip, encode, upload."""
        try:
            check_task(task, self.config.task_bounds)  # before any work, even before a download
        except TaskRefused as err:
            return self._refused(task, err)
        self.scheduler.abandon_unless(task.round_id)
        if task.encoding == SECAGG:  # advertise now; the stages come in later cycles (`secagg_step`)
            return self.secagg.start(task)
        try:
            model_dir = self._model_for(task.model_version)
        except ModelRejected as err:
            log.warning("%s", err)
            return CycleReport("model_rejected", (str(err),), round_id=task.round_id,
                               model_version=task.model_version)
        return self._train_and_upload(task, model_dir)

    def secagg_step(self) -> CycleReport | None:
        """One step of the secure aggregation round this device holds (None: it holds none). Asks
        the server for the round's status and does what it says (`edge_runtime.secagg_job`)."""
        if self.device_id is None:
            return None
        return self.secagg.step()

    def _model_for(self, version: int) -> Path:
        current = self.models.current_version
        activate = current is None or version > current
        files = TRAINING_FILES + (SUGGESTION_FILES if self.config.suggestions and activate else ())
        if not self.models.holds(version, files):
            self._ensure_trusted_keys()
            self.models.fetch(self.client, version, activate=activate, files=files)
        return self.models.version_dir(version)

    def _refused(self, task: RoundTask, err: TaskRefused) -> CycleReport:
        """A task outside this device's bounds: not run. The protocol has no way to tell the server,
        so it is logged (and the round's slot lapses at the server's deadline)."""
        log.warning("%s", err)
        return CycleReport("refused", (err.code,), round_id=task.round_id, model_version=task.model_version,
                           message=str(err))

    def _train_and_upload(self, task: RoundTask, model_dir: Path) -> CycleReport:
        trained = self._train(task, model_dir)
        if isinstance(trained, CycleReport):
            return trained
        update, outcome, up_to = trained
        where = dict(round_id=task.round_id, model_version=task.model_version)
        body = encode_update(update.deltas, UpdateMetadata(
            round_id=task.round_id, model_version=task.model_version, device_id=self.device_id,
            num_examples=update.num_examples, clip_norm=update.clip_norm, update_norm=update.update_norm,
            encoding=task.encoding, update_bits=task.update_bits, rotation_seed=task.rotation_seed))
        self._keep_in_outbox(task, body, up_to)
        report = dict(num_examples=update.num_examples, update_norm=update.update_norm, upload_bytes=len(body),
                      steps=outcome.steps_run, mean_loss=update.mean_loss, **where)
        result = self._upload(task.round_id, body, up_to)
        if result is None:
            return CycleReport("upload_failed", ("server_unavailable",), **report)
        return CycleReport(result.status, (result.code,) if result.code else (), upload_attempts=result.attempts,
                           **report)

    def _train(self, task: RoundTask, model_dir: Path) -> tuple[LocalUpdate, JobOutcome, int] | CycleReport:
        """Run the task's job under the scheduler: the clipped, finite update with its outcome and the
        newest example id it trained on, or the cycle's report when there is none (no data, refused,
        interrupted, abandoned, not finite)."""
        model, global_weights = self.trainables.load(model_dir)
        up_to = self.examples.last_id()
        where = dict(round_id=task.round_id, model_version=task.model_version)
        if task.batch_size != model.batch_size:
            return self._refused(task, TaskRefused(f"round {task.round_id}: task refused: batch size "
                                                   f"{task.batch_size} differs from the model's static {model.batch_size}"))
        pending = self.scheduler.pending()
        if pending is not None and pending.key == job_key(task):
            windows = None  # resuming: the checkpoint carries the job's windows (the scheduler matches the key)
        else:
            windows = self.examples.token_windows(load_tokenizer(model_dir / TOKENIZER_FILE), model.seq_len,
                                                  up_to_id=up_to)
            if len(windows) == 0:
                return CycleReport("no_data", **where)
            try:
                check_steps(task, len(windows), self.config.task_bounds)
            except TaskRefused as err:
                return self._refused(task, err)
        job = TrainingJob(model, global_weights, windows, task, seed=self._seed(task.round_id), up_to_id=up_to)
        outcome: JobOutcome = self.scheduler.run(job)
        if outcome.status != COMPLETED:
            action = "abandoned" if outcome.status == ABANDONED else "interrupted"
            return CycleReport(action, outcome.reasons, steps=outcome.steps_run, **where)
        up_to = job.up_to_id  # a resumed job's own, from its checkpoint: not what was typed meanwhile

        update = job.result(outcome.losses)
        if not _finite_update(update):
            # A learning rate that diverged (or a broken model): such an update would only poison the
            # global model, and the server would refuse it anyway. Dropped, and the text stays untrained.
            log.warning("round %d: training gave a non-finite update (norm %s); not uploading it", task.round_id,
                        update.update_norm)
            return CycleReport("not_finite", ("non_finite_update",), steps=outcome.steps_run, **where)
        return update, outcome, up_to

    # Uploads and the outbox ------------------------------------------------------------------
    def _upload(self, round_id: int, body: bytes, up_to: int) -> UploadResult | None:
        """Upload; on a final answer clear the outbox (and, if counted, the new-example count)."""
        try:
            result = self.client.upload(round_id, body)
        except ServerUnavailable as err:
            log.warning("round %d: upload failed, kept in the outbox for the next cycle (%s)", round_id, err)
            return None
        except ServerError as err:  # 401: a token the server no longer knows
            log.warning("round %d: upload refused (%s); dropping it", round_id, err)
            result = UploadResult("rejected", 1, code=err.code, message=err.message)
        if result.counted:
            self.examples.mark_trained(up_to)
        for suffix in (".safetensors", ".json"):
            (self.outbox / f"{round_id}{suffix}").unlink(missing_ok=True)
        log.info("round %d: update %s after %d attempt(s)", round_id, result.status, result.attempts)
        return result

    def _keep_in_outbox(self, task: RoundTask, body: bytes, up_to: int) -> None:
        self.outbox.mkdir(exist_ok=True)
        # The body first: a record is written only for a durable body. A body without its record
        # (a crash between the two) reads as expired and is dropped, never sent half-described.
        atomic_write(self.outbox / f"{task.round_id}.safetensors", body)
        atomic_write_json(self.outbox / f"{task.round_id}.json", {"deadline": task.deadline, "up_to_id": up_to})

    def _pending_uploads(self) -> list[Path]:
        return sorted(self.outbox.glob("*.safetensors")) if self.outbox.is_dir() else []

    def _flush_outbox(self) -> CycleReport | None:
        """Re-send updates that an outage kept here; drop those past their round's deadline."""
        report = None
        for body_path in self._pending_uploads():
            round_id = int(body_path.stem)
            try:
                info = json.loads((self.outbox / f"{round_id}.json").read_text())
            except (OSError, ValueError):
                info = {"deadline": 0.0, "up_to_id": 0}
            if self._clock() >= float(info["deadline"]):
                log.info("round %d: pending update expired; dropping it", round_id)
                body_path.unlink(missing_ok=True)
                (self.outbox / f"{round_id}.json").unlink(missing_ok=True)
                continue
            body = body_path.read_bytes()
            result = self._upload(round_id, body, int(info["up_to_id"]))
            if result is None:
                return CycleReport("upload_failed", ("server_unavailable",), round_id=round_id,
                                   upload_bytes=len(body))
            report = CycleReport(result.status, (result.code,) if result.code else (), round_id=round_id,
                                 upload_bytes=len(body), upload_attempts=result.attempts)
        return report

    def _seed(self, round_id: int) -> int:
        if self.config.seed is not None:
            return self.config.seed + round_id
        digest = hashlib.sha256(f"{self.device_id}:{round_id}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    # The loop --------------------------------------------------------------------------------
    def run(self, *, stop: threading.Event | None = None, max_cycles: int | None = None) -> list[CycleReport]:
        """Cycle until `stop` is set (or `max_cycles` ran), sleeping as the server and state say."""
        stop = stop or threading.Event()
        reports: list[CycleReport] = []
        while not stop.is_set() and (max_cycles is None or len(reports) < max_cycles):
            try:
                report = self.run_once()
            except ServerUnavailable as err:
                log.warning("server unreachable: %s", err)
                report = CycleReport("wait", ("server_unavailable",), retry_after=self.config.poll_seconds)
            except Exception as err:  # noqa: BLE001 — whatever a server sends, the loop goes on
                report = self._error_report(err)
            reports.append(report)
            log.info("cycle: %s", json.dumps(report.to_json()))
            if max_cycles is not None and len(reports) >= max_cycles:
                break
            stop.wait(min(next_delay(report, self.config.poll_seconds), self.config.task_bounds.max_retry_after))
        return reports

    def _error_report(self, err: Exception) -> CycleReport:
        """A cycle the server refused, a reply that broke the protocol, a model that failed its
        checks, or anything else: one log line and a report, and the loop goes on (the server
        may come back to its senses, a new version may come)."""
        if isinstance(err, ModelRejected):
            log.error("cycle failed: %s", err)
            return CycleReport("error", ("model_rejected",), message=str(err))
        if not isinstance(err, ServerError):
            code = getattr(err, "code", None)
            code = code if isinstance(code, str) else ("error" if isinstance(err, FedkbError) else "internal_error")
            message = str(err) if isinstance(err, FedkbError) else f"{type(err).__name__}: {err}"
            log.error("cycle failed (%s): %s", code, message)
            return CycleReport("error", (code,), message=message)
        message = str(err)
        if err.status == 401:
            message = (f"the server does not accept this device's credentials ({err.code}: {err.message}); "
                       f"if its state was reset, delete {self.home / CREDENTIALS_FILE} and start the device "
                       "again to enroll anew")
        log.error("cycle failed: %s", message)
        return CycleReport("error", (err.code,), message=message)


def next_delay(report: CycleReport, poll_seconds: float) -> float:
    """Seconds to wait after a cycle: what the server asked for, the poll interval while there is
    nothing to do or after an error (backing off rather than hammering a server that refuses),
    and a moment after real work (the next round may already be open)."""
    if report.action == "wait":
        return report.retry_after or poll_seconds
    if report.action.startswith("secagg_") and report.action != "secagg_refused":
        return report.retry_after or 1.0  # the round's next stage: back as soon as the server says
    if report.action in ("ineligible", "interrupted", "no_data", "upload_failed", "model_rejected", "refused",
                         "not_finite", "error", "secagg_refused"):
        return poll_seconds
    return 1.0


def _finite_update(update) -> bool:
    return math.isfinite(update.update_norm) and all(bool(np.isfinite(d).all()) for d in update.deltas.values())


def load_pinned_keys(home: Path) -> TrustedKeys | None:
    """The model signing key pinned at enrollment, if any."""
    path = Path(home) / PINNED_KEYS_FILE
    return TrustedKeys.from_files([path]) if path.is_file() else None


def load_credentials(home: Path) -> Credentials | None:
    path = Path(home) / CREDENTIALS_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        return Credentials(device_id=str(body["device_id"]), token=str(body["token"]))
    except (ValueError, KeyError, TypeError):
        raise FedkbError(f"{path}: unreadable credentials; delete it to enroll again") from None


def save_credentials(home: Path, credentials: Credentials) -> None:
    """Write the token readable by this user only, atomically."""
    atomic_write_json(Path(home) / CREDENTIALS_FILE, dataclasses.asdict(credentials), permissions=0o600)
