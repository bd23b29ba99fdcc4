"""The round lifecycle as plain decisions over a round's record: no SQL, no HTTP.

A round opens with model version v and hands tasks to devices until ceil(goal × over-selection)
hold one (over-selection absorbs dropout, Bonawitz et al., 2019, "Towards Federated Learning at
Scale", https://arxiv.org/abs/1902.01046). It closes when `goal` updates are accepted, or at its
deadline if at least `min` were; otherwise it is abandoned. Devices that find no work are told to
come back after a jittered delay (pace steering), so a fleet does not return in lockstep.
"""

from __future__ import annotations

import dataclasses
import json
import random
import secrets

from aggregator.adaptive_clipping import update_noise_multiplier
from fedkb_core.protocol import CheckinResponse, RoundTask, SecAggTask
from fedkb_core import hadamard
from fedkb_core.secagg.integer_encoding import CALIBRATION_BITS, SecAggGrid, modulus_bits, tuned_steps
from fedkb_core.update_encoding import HADAMARD, SECAGG, UpdateEncoding

OPEN, CLOSING, CLOSED, ABANDONED = "open", "closing", "closed", "abandoned"
ACTIVE_STATES = (OPEN, CLOSING)


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One round as the database holds it (the server's RoundConfig plus its progress)."""

    id: int
    model_version: int
    state: str
    opened_at: float
    deadline: float
    min_clients: int
    goal_clients: int
    max_assigned: int
    clip_norm: float
    learning_rate: float
    epochs: int
    batch_size: int
    max_examples: int
    encoding: str
    update_bits: int | None = None  # hadamard and secagg only
    rotation_seed: int | None = None  # hadamard and secagg only: drawn from the OS's CSPRNG at opening
    secagg_modulus_bits: int | None = None  # secagg only: r, the bits of every masked body value
    # secagg without DP (the tuned grid): the step of every rotation block as a JSON list, frozen at
    # opening; and, once the round's sum was measured, its block RMS per device (JSON), which the
    # next round's steps follow (fedkb_core/secagg/integer_encoding.py, `tuned_steps`).
    secagg_steps: str | None = None
    secagg_block_rms: str | None = None
    secagg_dropped_blocks: str | None = None  # the blocks a tuned round left out (JSON list), set at close
    assigned: int = 0
    accepted: int = 0
    folded: int = 0
    total_examples: int = 0
    closed_at: float | None = None
    outcome: str | None = None  # why it closed or was abandoned
    published_version: int | None = None
    aggregate_seconds: float | None = None
    publish_seconds: float | None = None
    # Differential privacy (None when off), frozen at opening like the rest: the total noise
    # multiplier Z the accountant uses, the multiplier z_delta of the noise actually added to the
    # update sum (Z itself with a fixed clip; higher with adaptive clipping, which spends part of
    # the budget on the clipped count, whose noise has stddev sigma_b), and the fixed denominator.
    dp_noise_multiplier: float | None = None
    dp_update_noise_multiplier: float | None = None
    dp_clipped_count_stddev: float | None = None
    dp_denominator: int | None = None
    # Set when the round closes (adaptive clipping): the noised fraction of updates that were not
    # clipped, and the clip norm the next round uses.
    dp_unclipped_fraction: float | None = None
    dp_next_clip_norm: float | None = None

    @property
    def dp_enabled(self) -> bool:
        return self.dp_noise_multiplier is not None

    @property
    def secure(self) -> bool:
        """Whether this round runs secure aggregation (docs/secure_aggregation.md)."""
        return self.encoding == SECAGG

    @property
    def secagg_task(self) -> SecAggTask | None:
        """What a SecAgg round's task adds: the modulus, unit weights under DP, and adaptive
        clipping's "not clipped" bit inside the vector (the server cannot count it otherwise)."""
        if not self.secure:
            return None
        steps = None if self.secagg_steps is None else tuple(json.loads(self.secagg_steps))
        return SecAggTask(modulus_bits=self.secagg_modulus_bits, unit_weights=self.dp_enabled,
                          count_unclipped=self.dp_clipped_count_stddev is not None, steps=steps)

    def secagg_grid(self, length: int) -> SecAggGrid:
        """The round's common grid for a model of `length` parameters (what every device encodes on:
        the grid of the task this round hands out)."""
        return SecAggGrid.for_task(self.task(), length)

    def task(self, report_by: float | None = None) -> RoundTask:
        """The task a device receives for this round (with its own report-by time, if it has one)."""
        return RoundTask(round_id=self.id, model_version=self.model_version, learning_rate=self.learning_rate,
                         epochs=self.epochs, batch_size=self.batch_size, max_examples=self.max_examples,
                         clip_norm=self.clip_norm, deadline=self.deadline, encoding=self.encoding,
                         update_bits=self.update_bits, rotation_seed=self.rotation_seed, report_by=report_by,
                         secagg=self.secagg_task)

    @property
    def update_encoding(self) -> UpdateEncoding:
        """What this round's uploads must be in (the server rejects anything else)."""
        return UpdateEncoding(self.encoding, self.update_bits, self.rotation_seed)

    def accepting(self, now: float) -> bool:
        """Whether an upload arriving now may still count."""
        return self.state == OPEN and now < self.deadline


def round_settings(config, *, model_version: int, batch_size: int, now: float,
                   previous: RoundRecord | None = None, length: int | None = None,
                   measured: list[RoundRecord] = ()) -> dict:
    """The columns of a new round, frozen from the config at opening time.

    Args:
        previous: the last round that published a version; with adaptive clipping the new round
            clips at the norm that round chose (`dp_next_clip_norm`), so a restart continues the
            sequence. Without one (or without adaptive clipping) the clip norm is the config's.
        length: the model's parameter count (a tuned SecAgg grid has one step per block of it).
        measured: the last SecAgg rounds whose sums were measured (`secagg_block_rms`, at most
            MEASURED_ROUNDS of them, newest first): a tuned grid's steps follow their
            `tuning_history` with as many blocks as the model. With none (the first round, a model
            of another size, or after a sum refused as overflowing) the round calibrates: it runs on the fixed grid at CALIBRATION_BITS (b = 12, r = 12 + ⌈log₂ m⌉,
            about 2× the bytes, once), whose fine steps measure the sum's spread accurately; the
            prior's steps (one device of norm C in one block) would be hundreds of times too coarse
            for real updates and their rounding noise would swamp the first rounds.
    """
    settings = dict(model_version=model_version, state=OPEN, opened_at=now, deadline=now + config.round_timeout,
                    min_clients=config.min_clients, goal_clients=config.goal_clients,
                    max_assigned=config.max_assigned, clip_norm=config.clip_norm, learning_rate=config.device_lr,
                    epochs=config.device_epochs, batch_size=batch_size, max_examples=config.device_max_examples,
                    **update_encoding_settings(config))
    if config.dp_enabled:
        settings.update(privacy_settings(config))
        if config.dp_adaptive_clipping and previous is not None and previous.dp_next_clip_norm is not None:
            settings["clip_norm"] = previous.dp_next_clip_norm
    if config.secagg_tuned:
        if length is None:
            raise ValueError("a tuned secure aggregation grid needs the model's parameter count")
        blocks = hadamard.num_blocks(length)
        rows = [json.loads(m.secagg_block_rms) for m in tuning_history(measured)]
        rows = [row for row in rows if len(row) == blocks]  # a model of another size: not this one's
        if rows:
            steps = tuned_steps(config.update_bits, config.max_assigned, settings["clip_norm"], blocks, rows)
            settings["secagg_steps"] = json.dumps(steps)
        else:  # calibration: the fixed grid, fine enough to measure the spread the next rounds follow
            settings.update(update_bits=CALIBRATION_BITS,
                            secagg_modulus_bits=modulus_bits(CALIBRATION_BITS, config.max_assigned))
    return settings


def tuning_history(measured: list[RoundRecord]) -> list[RoundRecord]:
    """The measured rounds (newest first) a tuned grid's next steps follow: back to the last
    calibration round (a fixed-grid round: its accurate measurement starts a new history), none
    if the newest was refused as overflowing (its spread outgrew the prediction, so the next round
    calibrates rather than guess again)."""
    history = []
    for record in measured:
        if record.secagg_block_rms is None or record.state == ABANDONED:
            break
        history.append(record)
        if record.secagg_steps is None:
            break
    return history


def update_encoding_settings(config) -> dict:
    """A round's upload encoding; a `hadamard` or `secagg` round's rotation seed is 63 bits of the
    OS's CSPRNG, stored with the round (same INSERT, as durable as the round), so no device can
    prepare an update for a rotation it knows in advance, and a restarted server decodes with the
    same seed. A `secagg` round's modulus: on the fixed grid (DP) r = b + ⌈log₂ max_assigned⌉
    holds the sum of every task it may hand out (the config refused r > 32 at start); on the tuned
    grid r = b, and `round_settings` adds the steps that make the sum fit."""
    if config.update_encoding == SECAGG:
        r = config.update_bits if config.secagg_tuned else modulus_bits(config.update_bits, config.max_assigned)
        return dict(encoding=SECAGG, update_bits=config.update_bits, rotation_seed=secrets.randbits(63),
                    secagg_modulus_bits=r)
    if config.update_encoding != HADAMARD:
        return dict(encoding=config.update_encoding)
    return dict(encoding=HADAMARD, update_bits=config.update_bits, rotation_seed=secrets.randbits(63))


def privacy_settings(config) -> dict:
    """A DP round's noise columns: Z, the update noise z_delta, sigma_b and the denominator (the goal)."""
    z = float(config.dp_noise_multiplier)
    sigma_b = config.resolved_clipped_count_stddev if config.dp_adaptive_clipping else None
    return dict(dp_noise_multiplier=z,
                dp_update_noise_multiplier=update_noise_multiplier(z, sigma_b) if sigma_b is not None else z,
                dp_clipped_count_stddev=sigma_b, dp_denominator=config.goal_clients)


def checkin_decision(round_: RoundRecord | None, *, has_task: bool, has_submitted: bool, now: float,
                     task_reclaimed: bool = False) -> str:
    """What a checking-in device gets: "train", "assign" (a new task) or a wait reason.

    Wait reasons: `no_open_round` (between rounds, or past the deadline), `already_submitted`
    (this device's update for the round is in), `task_expired` (it held a task of this round and
    let its report-by time pass: its slot went to another device, and it gets no second one),
    `round_full` (enough devices hold tasks).
    """
    if round_ is None or not round_.accepting(now):
        return "no_open_round"
    if has_submitted:
        return "already_submitted"
    if task_reclaimed:
        return "task_expired"
    if has_task:
        return "train"
    if round_.assigned >= round_.max_assigned:
        return "round_full"
    return "assign"


def report_by(round_: RoundRecord, now: float, window: float) -> float:
    """When a task handed out now must be reported: `window` seconds on, but never past the deadline.

    A device that takes a task and goes silent holds its slot only this long (slots are reclaimed
    lazily, when another device finds the round full), so a few silent devices cannot starve a
    round of the devices that would report.
    """
    return min(round_.deadline, now + window)


def deadline_outcome(round_: RoundRecord, now: float) -> str | None:
    """At or after the deadline of an open round: CLOSING if it has its minimum, else ABANDONED."""
    if round_.state != OPEN or now < round_.deadline:
        return None
    return CLOSING if round_.accepted >= round_.min_clients else ABANDONED


def state_after_accept(round_: RoundRecord) -> str:
    """An accepted update that reaches the goal closes the round to further uploads."""
    return CLOSING if round_.accepted + 1 >= round_.goal_clients else OPEN


def state_after_quarantine(round_: RoundRecord) -> str:
    """The state once one accepted update is set aside (its blob no longer folds).

    A round that was closing opens again unless it still has its goal without that update; the
    deadline rule then decides as for any open round (close with `min_clients`, else abandon), so
    one damaged blob costs the round one update, never the round.
    """
    if round_.state == CLOSING and round_.accepted - 1 < round_.goal_clients:
        return OPEN
    return round_.state


def retry_after(base: float, jitter: float, rng: random.Random | None = None) -> float:
    """base × U(1 − jitter, 1 + jitter), rounded to 10 ms."""
    r = (rng or random).uniform(1.0 - jitter, 1.0 + jitter)
    return round(max(0.01, base * r), 2)


def wait_response(reason: str, *, base: float, jitter: float, rng: random.Random | None = None) -> CheckinResponse:
    return CheckinResponse("wait", retry_after=retry_after(base, jitter, rng), reason=reason)
