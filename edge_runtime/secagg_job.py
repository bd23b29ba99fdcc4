"""A device's secure-aggregation rounds over HTTP (docs/secure_aggregation.md, "Over HTTP").

A task with encoding `secagg` is not trained and uploaded in one cycle: the device takes part in
the round's stages, one step per cycle, each driven by the server's `SecAggStatus`:

    check-in   the task, kept durably; the round's two public keys advertised (`start`)
    each later cycle (`step`): GET the status, then by its action
      wait       nothing (come back after its retry_after, clamped by the device's bounds)
      share      the participant's boxes for its neighbours, posted
      upload     the inbox opened; the task's job trained with LiteRT under the scheduler (as any
                 task: a device that stops being eligible is interrupted and resumes later), Δ
                 clipped, encoded on the round's common grid (`integer_encoding.encode`, the grid
                 from the task and the manifest), masked, kept in the outbox and uploaded
      unmask     the participant's answer, posted
      done       the round's secrets forgotten
      dropped    the same, and the server's reason logged

Everything between stages is on disk, in `home/secagg/`: the participant's files
(`edge_runtime.secagg_participant`: keys, shares, answers), `task-<round>.json` (the task, and
whether the server has the keys) and `input-<round>.npy` (the encoded vector before masking, 0600,
so a crash between masking and the outbox gives the same masked vector again, never a second one),
plus the masked body in the outbox. A restarted process continues the round where it was.

A refusal by the participant (`SecAggRefused`), a server that refuses one of the device's
messages, a task whose grid the device cannot build, or the round's deadline passing: the device
drops out of the round (forgets it and uploads nothing more for it), logged with the code.

Each step's report carries the round's stage after it and the CPU time (thread time, ms) the
step spent in secure aggregation's own work: key generation, sharing, opening the inbox and
masking, unmasking (`secagg_ms`), and the encoding onto the grid (`encode_ms`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from edge_runtime.bounds import clamp_retry_after
from edge_runtime.client import ServerError
from edge_runtime.cycle_report import CycleReport
from edge_runtime.model_store import ModelRejected
from edge_runtime.secagg_participant import SecAggParticipant, SecAggRefused
from fedkb_core.durable import atomic_file, atomic_write_json
from fedkb_core.manifest import load_manifest
from fedkb_core.protocol import ProtocolError, RoundTask, to_json
from fedkb_core.secagg import integer_encoding
from fedkb_core.secagg.integer_encoding import MASK_BITS, SecAggGrid
from fedkb_core.secagg.masked_wire import encode_masked
from fedkb_core.secagg.messages import SecAggStatus

log = logging.getLogger(__name__)

FOLDER = "secagg"
LEFT_FILE = "left.json"  # the rounds this device is done with, newest last
LEFT_ROUNDS = 64
EXPIRY_GRACE = 24 * 3600.0  # seconds past the round's deadline a device that masked still waits to unmask
_TASK = re.compile(r"task-(0|[1-9][0-9]{0,18})\.json")
_CODE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# What a step's report says it did (docs/architecture.md, the cycle report's actions).
ADVERTISED, WAIT, SHARED, UNMASKED, DONE, DROPPED, REFUSED = (
    "secagg_advertised", "secagg_wait", "secagg_shared", "secagg_unmasked", "secagg_done", "secagg_dropped",
    "secagg_refused")
# The device's own refusal of a grid its task and manifest cannot make, or of a neighbour list
# whose modulus is not the task's (the participant would mask modulo another 2^r than the grid).
GRID_REFUSED = "bad_grid"
MODULUS_MISMATCH = "modulus_mismatch"
# Why a device that was merely late leaves a round: over-selection makes some every round, so they
# are logged at INFO, not WARNING (the server's dropped reasons and a masked upload's refusals).
LATE_CODES = frozenset({"missed_advertising", "missed_sharing", "missed_input", "secagg_wrong_stage", "round_closed",
                        "task_expired"})


def flatten(deltas: dict[str, np.ndarray]) -> np.ndarray:
    """Δ as one vector, weights in name order: the layout the server reads a sum back in
    (`fedkb_core.wire.split_by_name`)."""
    return np.concatenate([np.ravel(np.asarray(deltas[name], np.float32)) for name in sorted(deltas)])


def grid_for(task: RoundTask, length: int) -> SecAggGrid:
    """The round's common grid from the task and the model's weight count.

    Raises:
        ValueError: the task's settings do not make a grid.
    """
    grid = SecAggGrid.for_task(task, length)
    problems = grid.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return grid


def grid_tail(task: RoundTask) -> int:
    """The masked vector's wide tail: the weight, and adaptive clipping's bit if the round counts it."""
    return integer_encoding.tail_length(task.secagg is not None and task.secagg.count_unclipped)


def _code(value: str | None, default: str) -> str:
    """A server-given reason as a report's reason: a plain code, or `default`."""
    return value if isinstance(value, str) and _CODE.fullmatch(value) else default


class _Timer:
    """CPU time of the current thread, summed over the `with` blocks, in ms."""

    def __init__(self):
        self.ms = 0.0

    def __enter__(self):
        self._start = time.thread_time()
        return self

    def __exit__(self, *exc):
        self.ms += (time.thread_time() - self._start) * 1000.0
        return False


class SecAggRounds:
    """The SecAgg rounds of one device, durable in `device.home / "secagg"`.

    `device` is the `edge_runtime.device.Device` that owns this (not imported here: it imports
    this module): its client, scheduler, model store, examples, outbox, bounds and training are
    used. Nothing is held in memory between calls (a new object over the same home continues).
    """

    def __init__(self, device):
        self.device = device
        self.folder = Path(device.home) / FOLDER
        self._participant: SecAggParticipant | None = None

    # State --------------------------------------------------------------------------------
    @property
    def participant(self) -> SecAggParticipant:
        device_id = self.device.device_id
        if self._participant is None or self._participant.device_id != device_id:
            self._participant = SecAggParticipant(self.folder, device_id)
        return self._participant

    def _task_path(self, round_id: int) -> Path:
        return self.folder / f"task-{round_id}.json"

    def _input_path(self, round_id: int) -> Path:
        return self.folder / f"input-{round_id}.npy"

    def _held(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_TASK.fullmatch, (p.name for p in self.folder.iterdir())) if m)

    def held_round(self) -> int | None:
        """The round this device takes part in (the newest whose task it keeps), if any."""
        held = self._held()
        return held[-1] if held else None

    def _load(self, round_id: int) -> tuple[RoundTask, dict]:
        """The kept task and its record; a record that does not read is the round dropped."""
        try:
            record = json.loads(self._task_path(round_id).read_text(encoding="utf-8"))
            task = RoundTask.from_json(record["task"])
        except (OSError, ValueError, KeyError, TypeError, ProtocolError) as err:
            raise SecAggRefused("state_unreadable", f"{self._task_path(round_id)}: {err}") from None
        if task.round_id != round_id:
            raise SecAggRefused("state_unreadable", f"{self._task_path(round_id)} holds round {task.round_id}")
        return task, record

    def _save(self, task: RoundTask, **record) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self._task_path(task.round_id), {"task": to_json(task), **record}, indent=None,
                          permissions=0o600)

    def forget(self, round_id: int) -> None:
        """Delete everything the device keeps of the round: secrets, shares, task, encoded input,
        a masked update still in the outbox, a job checkpoint for it."""
        if self.device.device_id is not None and self.folder.is_dir():
            try:
                self.participant.forget(round_id)
            except SecAggRefused as err:  # an unreadable current.json: the round's own file goes anyway
                log.warning("round %d: %s", round_id, err)
                (self.folder / f"round-{round_id}.json").unlink(missing_ok=True)
        self._input_path(round_id).unlink(missing_ok=True)
        for suffix in (".safetensors", ".json"):
            (self.device.outbox / f"{round_id}{suffix}").unlink(missing_ok=True)
        pending = self.device.scheduler.pending()
        if pending is not None and pending.key.round_id == round_id:
            self.device.scheduler.checkpoints.clear()
        left = [r for r in self._left() if r != round_id] + [round_id]
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self.folder / LEFT_FILE, {"rounds": left[-LEFT_ROUNDS:]}, indent=None, permissions=0o600)
        self._task_path(round_id).unlink(missing_ok=True)

    def _left(self) -> list[int]:
        """Rounds this device is done with (finished, dropped, refused): a check-in that hands out
        the same task again (the server re-sends a task until its holder reports) is not taken up
        again with fresh keys."""
        try:
            rounds = json.loads((self.folder / LEFT_FILE).read_text(encoding="utf-8"))["rounds"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [r for r in rounds if isinstance(r, int) and not isinstance(r, bool)] if isinstance(rounds, list) else []

    # Reports ------------------------------------------------------------------------------
    def _report(self, action: str, task: RoundTask, reasons=(), *, status: SecAggStatus | None = None,
                timer: _Timer | None = None, **fields) -> CycleReport:
        if status is not None:
            fields.setdefault("retry_after", clamp_retry_after(status.retry_after, self.device.config.task_bounds))
            fields.setdefault("stage", status.stage)
        if timer is not None:
            fields.setdefault("secagg_ms", round(timer.ms, 3))
        return CycleReport(action, tuple(reasons), round_id=task.round_id, model_version=task.model_version, **fields)

    def _drop(self, task: RoundTask, action: str, code: str, message: str, **fields) -> CycleReport:
        """Out of the round: forget it, log why (a device that was merely late, as over-selection
        makes some devices every round, at INFO; anything else at WARNING), report it."""
        log.log(logging.INFO if code in LATE_CODES else logging.WARNING,
                "round %d: secure aggregation: %s (%s): %s; this device leaves the round", task.round_id,
                action.removeprefix("secagg_"), code, message)
        self.forget(task.round_id)
        return self._report(action, task, (code,), message=message, **fields)

    def _server_refused(self, task: RoundTask, err: ServerError, **fields) -> CycleReport:
        """A SecAgg request the server refused (409 conflict or wrong stage, 400 with the cohort's code,
        403 no_task, 404): the device cannot act in this round any more. 401 is the device's own
        problem (its credentials), raised for the loop to report."""
        if err.status == 401:
            raise err
        return self._drop(task, DROPPED, _code(err.code, "server_error"), f"{err.status} {err.code}: {err.message}",
                          **fields)

    # Stage 0 ------------------------------------------------------------------------------
    def start(self, task: RoundTask) -> CycleReport:
        """A SecAgg task from the check-in: keep it, draw the round's keys and advertise them
        (unless the device has left that round already: it never takes part twice)."""
        if task.round_id in self._left():
            return self._report(DROPPED, task, ("left_round",), retry_after=self.device.config.poll_seconds,
                                message=f"this device has left round {task.round_id} already")
        for other in self._held():  # one round at a time: an older one is over for this device
            if other != task.round_id:
                log.info("round %d: forgetting secure aggregation round %d for the new task", task.round_id, other)
                self.forget(other)
        self._save(task, advertised=False)
        return self._advertise(task)

    def _advertise(self, task: RoundTask) -> CycleReport:
        timer = _Timer()
        try:
            with timer:
                keys = self.participant.advertise(task.round_id)
        except (SecAggRefused, ValueError) as err:
            code = getattr(err, "code", "bad_round")
            return self._drop(task, REFUSED, code, str(err))
        try:
            status = self.device.client.secagg_keys(keys)
        except ServerError as err:
            return self._server_refused(task, err, secagg_ms=round(timer.ms, 3))
        self._save(task, advertised=True)
        log.info("round %d: secure aggregation keys advertised (stage %s)", task.round_id, status.stage)
        return self._report(ADVERTISED, task, status=status, timer=timer)

    # Later stages -------------------------------------------------------------------------
    def step(self) -> CycleReport | None:
        """One step of the held round (None: no round held)."""
        round_id = self.held_round()
        if round_id is None:
            return None
        try:
            task, record = self._load(round_id)
        except SecAggRefused as err:
            log.warning("round %d: %s; forgetting the round", round_id, err)
            self.forget(round_id)
            return CycleReport(REFUSED, (err.code,), round_id=round_id, message=str(err))
        # Past the round's deadline no input is taken; unmasking may run on after it (its own stage
        # timeout), so a device that has masked gives up only a day later (a server that never says).
        masked = self._input_path(round_id).exists() or (self.device.outbox / f"{round_id}.safetensors").exists()
        if self.device._clock() >= task.deadline + (EXPIRY_GRACE if masked else 0.0):
            return self._drop(task, DROPPED, "expired", "the round's deadline passed")
        if not record.get("advertised"):
            return self._advertise(task)
        try:
            status = self.device.client.secagg_status(round_id)
        except ServerError as err:
            return self._server_refused(task, err)
        try:
            return self._act(task, status)
        except SecAggRefused as err:
            return self._drop(task, REFUSED, err.code, err.message)

    def _act(self, task: RoundTask, status: SecAggStatus) -> CycleReport:
        action = status.action
        if action == "wait":
            return self._report(WAIT, task, status=status)
        if action == "done":
            self.forget(task.round_id)
            log.info("round %d: secure aggregation done (stage %s)", task.round_id, status.stage)
            return self._report(DONE, task, status=status, retry_after=None)
        if action == "dropped":
            reason = _code(status.reason, "unknown")
            return self._drop(task, DROPPED, reason, f"the server dropped this device (stage {status.stage})",
                              status=status, retry_after=None)
        if action == "share":
            return self._share(task, status)
        if action == "upload":
            return self._upload(task, status)
        return self._unmask(task, status)

    def _share(self, task: RoundTask, status: SecAggStatus) -> CycleReport:
        neighbours = status.neighbours
        if task.secagg is None or neighbours.modulus_bits != MASK_BITS:
            return self._drop(task, REFUSED, MODULUS_MISMATCH, f"the neighbour list masks modulo "
                              f"2^{neighbours.modulus_bits}, not 2^{MASK_BITS} (the modulus of every mask and sum)")
        timer = _Timer()
        with timer:
            upload = self.participant.share(neighbours)
        try:
            answer = self.device.client.secagg_shares(upload)
        except ServerError as err:
            return self._server_refused(task, err, secagg_ms=round(timer.ms, 3))
        log.info("round %d: secure aggregation shares sent to %d neighbours", task.round_id, len(upload.boxes))
        return self._report(SHARED, task, status=answer, timer=timer)

    def _unmask(self, task: RoundTask, status: SecAggStatus) -> CycleReport:
        timer = _Timer()
        with timer:
            response = self.participant.unmask(status.unmask)
        try:
            answer = self.device.client.secagg_unmask(response)
        except ServerError as err:
            return self._server_refused(task, err, secagg_ms=round(timer.ms, 3))
        log.info("round %d: secure aggregation unmasked (%d seed shares, %d key shares)", task.round_id,
                 len(response.self_seed_shares), len(response.mask_key_shares))
        return self._report(UNMASKED, task, status=answer, timer=timer)

    # Stage 2: train, encode, mask, upload -------------------------------------------------
    def _upload(self, task: RoundTask, status: SecAggStatus) -> CycleReport:
        device, round_id = self.device, task.round_id
        timer, encoding = _Timer(), _Timer()
        with timer:
            self.participant.receive(status.inbox)
        kept = device.outbox / f"{round_id}.safetensors"
        if kept.is_file():  # masked already: the same bytes again (the server tells a retry from a conflict)
            return self._send(task, kept.read_bytes(), self._kept_up_to(round_id), status, timer, encoding, {})
        details: dict = {}
        values = self._kept_input(round_id)
        if values is not None:  # encoded before a restart: what it was trained on is in the record
            record = self._load(round_id)[1]
            up_to, details = int(record.get("up_to_id", 0)), dict(record.get("trained") or {})
        if values is None:
            try:
                model_dir = device._model_for(task.model_version)
            except ModelRejected as err:
                return self._drop(task, DROPPED, "model_rejected", str(err))
            trained = device._train(task, model_dir)
            if not isinstance(trained, tuple):  # no update this cycle
                if trained.action in ("interrupted",):
                    return dataclasses.replace(trained, stage=status.stage, secagg_ms=round(timer.ms, 3))
                return self._drop(task, DROPPED if trained.action != "refused" else REFUSED,
                                  (trained.reasons or (trained.action,))[0],
                                  trained.message or f"no update ({trained.action})")
            update, outcome, up_to = trained
            details = dict(num_examples=update.num_examples, update_norm=update.update_norm,
                           steps=outcome.steps_run, mean_loss=update.mean_loss)
            try:
                grid = grid_for(task, sum(spec.size for spec in load_manifest(model_dir).weights))
            except ValueError as err:
                return self._drop(task, REFUSED, GRID_REFUSED, f"the task's grid: {err}")
            with encoding:
                values = integer_encoding.encode(flatten(update.deltas), update.num_examples, grid,
                                                 np.random.default_rng(),  # the OS's entropy: the device's own
                                                 unclipped=update.update_norm <= update.clip_norm)
            self._keep_input(round_id, values, up_to, details)
        with timer:
            masked = self.participant.mask(values)
        body = encode_masked(masked, task.secagg.modulus_bits, tail_length=grid_tail(task), round_id=round_id,
                             device_id=device.device_id, model_version=task.model_version)
        device._keep_in_outbox(task, body, up_to)
        return self._send(task, body, up_to, status, timer, encoding, details)

    def _send(self, task: RoundTask, body: bytes, up_to: int, status: SecAggStatus, timer: _Timer, encoding: _Timer,
              details: dict) -> CycleReport:
        fields = dict(round_id=task.round_id, model_version=task.model_version, upload_bytes=len(body),
                      stage=status.stage, secagg_ms=round(timer.ms, 3), encode_ms=round(encoding.ms, 3) or None,
                      **details)
        result = self.device._upload(task.round_id, body, up_to)
        if result is None:
            return CycleReport("upload_failed", ("server_unavailable",), **fields)
        report = CycleReport(result.status, (result.code,) if result.code else (), upload_attempts=result.attempts,
                             **fields)
        if not result.counted:  # too late, or refused: this device's input will not count
            log.log(logging.INFO if result.code in LATE_CODES else logging.WARNING,
                    "round %d: secure aggregation: the masked update was %s (%s); this device leaves the round",
                    task.round_id, result.status, result.code)
            self.forget(task.round_id)
        return report

    def _kept_input(self, round_id: int) -> np.ndarray | None:
        path = self._input_path(round_id)
        try:
            with open(path, "rb") as f:
                values = np.load(f, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("round %d: %s is unreadable (%s); encoding again", round_id, path, err)
            return None
        return values if values.dtype == np.uint32 and values.ndim == 1 else None

    def _keep_input(self, round_id: int, values: np.ndarray, up_to: int, details: dict) -> None:
        with atomic_file(self._input_path(round_id), "wb", permissions=0o600) as f:
            np.save(f, values, allow_pickle=False)
        task, record = self._load(round_id)
        trained = {k: (v if not isinstance(v, float) or np.isfinite(v) else None) for k, v in details.items()}
        self._save(task, **{k: v for k, v in record.items() if k not in ("task", "up_to_id", "trained")},
                   up_to_id=int(up_to), trained=trained)

    def _kept_up_to(self, round_id: int) -> int:
        try:
            info = json.loads((self.device.outbox / f"{round_id}.json").read_text())
            return int(info["up_to_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

