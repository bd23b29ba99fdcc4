"""A SecAgg round's stages on the server: when each closes, what closing it writes, what a device is told.

docs/secure_aggregation.md, "Stages on the server". The protocol's rules are `SecAggCohort`'s
(aggregator/secagg_cohort.py); this module drives it over the database (aggregator/secagg_store.py),
always inside the caller's write transaction (`db.transaction` or the app's `GroupCommit`): a stage
closes under the write lock, and a device's answer is committed with the state it depends on.

A stage closes (`advance`) as soon as every device that could still act has acted (`complete`), when
its deadline passes (`stage_deadline`), or when the operator ends it (`end_now`, from
`POST /v1/admin/rounds/current/end`):

    advertising  every task holder advertised and the round handed out all its tasks
    sharing      every device of U1 shared
    input        goal_clients masked inputs accepted, or every device of U2 uploaded
    unmasking    every device of U3 answered; then the round is `closing` and the worker unmasks,
                 decodes and publishes (aggregator/secagg_release.py)

A stage's deadline is `secagg_stage_timeout` after it began; advertising, sharing and input also end
at the round's deadline (a task's `deadline`: no masked input is accepted after it), unmasking has
its own full timeout after input closed. A stage that closes without what the next one needs
abandons the round (`abandon`): the round's outcome and the cohort's `abandoned_reason` are
`secagg_<reason>` with the cohort's reason (`too_few_devices`, `impossible_thresholds`,
`too_few_shared`, `too_few_inputs`, `too_few_shares`, `inconsistent_shares`) or the server's
(`undecodable`: the unmasked sum is not a sum of honest vectors; `unfoldable`: an accepted masked
input was lost after input closed). An abandoned round publishes nothing and its keys, boxes and
answers are deleted (`secagg_store.forget`).
"""

from __future__ import annotations

import json
import secrets

from aggregator import db, secagg_store as store
from aggregator.rounds import ABANDONED as ROUND_ABANDONED
from aggregator.rounds import CLOSING, OPEN, RoundRecord
from aggregator.secagg_cohort import (ABANDONED, ADVERTISING, DONE, INPUT, SHARING, TOO_FEW_SHARES, UNMASKING,
                                      WRONG_STAGE, CohortAbandoned, SecAggRejected)
from fedkb_core.secagg import prg
from fedkb_core.secagg.messages import KeyAdvertisement, SecAggStatus, ShareUpload, UnmaskResponse

OPEN_STAGES = (ADVERTISING, SHARING, INPUT, UNMASKING)
FINISHED = "finished"  # SecAggStatus's name for a cohort that is done
UNFOLDABLE = "unfoldable"
# Why a device is out of a round (SecAggStatus.reason of `dropped`); an abandoned round's reason is
# its `secagg_<reason>`.
MISSED_ADVERTISING, MISSED_SHARING, PRUNED, MISSED_INPUT = "missed_advertising", "missed_sharing", "pruned", \
    "missed_input"


def open_cohort(conn, round_id: int, config, *, modulus_bits: int, vector_length: int, now: float) -> None:
    """The cohort of a round just inserted (same transaction), frozen from the config like the round."""
    store.insert_cohort(conn, round_id, vector_length=vector_length, modulus_bits=modulus_bits,
                        min_survivors=config.min_clients, tolerated_dropout=config.secagg_tolerated_dropout,
                        degree=config.secagg_degree, stage_timeout=config.secagg_stage_seconds, now=now)


def stage_deadline(row: store.CohortRow, round_: RoundRecord) -> float:
    """When the current stage closes with whoever acted (unix seconds)."""
    end = row.stage_started_at + row.stage_timeout
    return end if row.stage == UNMASKING else min(end, round_.deadline)


def complete(row: store.CohortRow, round_: RoundRecord, counts: dict[str, int]) -> bool:
    """Whether every device that could still act in the current stage has acted."""
    if row.stage == ADVERTISING:
        return round_.assigned >= round_.max_assigned and counts["advertised"] >= round_.assigned
    if row.stage == SHARING:
        return counts["shared"] >= counts["advertised"]
    if row.stage == INPUT:
        return counts["uploaded"] >= min(round_.goal_clients, counts["u2"])
    return row.stage == UNMASKING and counts["unmasked"] >= counts["u3"]


def due(conn, round_id: int, now: float) -> bool:
    """Whether the round's current stage should close now (a read: `advance` decides again under the lock)."""
    round_, row = db.get_round(conn, round_id), store.cohort_row(conn, round_id)
    if round_ is None or row is None or round_.state != OPEN or row.stage not in OPEN_STAGES:
        return False
    return now >= stage_deadline(row, round_) or complete(row, round_, store.counts(conn, round_id))


def advance(conn, round_id: int, now: float, *, end_now: bool = False) -> list[str]:
    """Close every stage that is due, in order (a round past its deadline may close several at
    once); with `end_now`, close the current stage whatever its state. Returns the stages closed."""
    closed = []
    while True:
        round_, row = db.get_round(conn, round_id), store.cohort_row(conn, round_id)
        if round_ is None or row is None or round_.state != OPEN or row.stage not in OPEN_STAGES:
            return closed
        if not (end_now or now >= stage_deadline(row, round_) or complete(row, round_, store.counts(conn, round_id))):
            return closed
        _close(conn, round_, row.stage, now)
        closed.append(row.stage)
        end_now = False


def _close(conn, round_: RoundRecord, stage: str, now: float) -> None:
    cohort, before = store.load(conn, round_.id, boxes=store.ALL if stage == SHARING else store.NONE,
                                answers=store.ALL if stage == UNMASKING else store.NONE)
    try:
        if stage == ADVERTISING:
            cohort.close_advertising(secrets.token_bytes(prg.SEED_BYTES))
        elif stage == SHARING:
            cohort.close_sharing()
        elif stage == INPUT:
            cohort.close_input()
        elif not cohort.ready():  # unmasking: a needed secret lacks t shares, and will never get them now
            abandon(conn, round_, TOO_FEW_SHARES, f"unmasking closed with {len(cohort.state.responses)} of "
                                                  f"{len(cohort.state.u3)} answers: a secret has fewer than "
                                                  f"{cohort.state.threshold} shares", now)
            return
        else:
            store.set_stage(conn, round_.id, DONE, now)
            db.update_round(conn, round_.id, state=CLOSING,
                            outcome=f"secure aggregation: {len(cohort.state.u3)} masked inputs, "
                                    f"{len(cohort.state.responses)} unmask answers")
            return
    except CohortAbandoned as err:
        abandon(conn, round_, err.reason, err.message, now)
        return
    store.save(conn, cohort, before, now)


def abandon(conn, round_: RoundRecord, reason: str, message: str, now: float) -> None:
    """The round ends with nothing published; its secrets are deleted."""
    code = f"secagg_{reason}"
    store.set_stage(conn, round_.id, ABANDONED, now, abandoned_reason=code, abandoned_message=message)
    store.forget(conn, round_.id)
    db.update_round(conn, round_.id, state=ROUND_ABANDONED, closed_at=now, outcome=f"{code}: {message}")


def _open_cohort(conn, round_id: int, **reads):
    loaded = store.load(conn, round_id, **reads)
    if loaded is None:
        raise SecAggRejected(WRONG_STAGE, f"round {round_id} does not run secure aggregation")
    return loaded


def receive(conn, round_id: int, device_id: str, message, now: float) -> None:
    """Apply one device's stage message (a retry of an accepted one is accepted again), then close
    the stage if that made it complete.

    Raises:
        SecAggRejected: the cohort's code; `wrong_stage` also for a round that is over.
    """
    advance(conn, round_id, now)  # a stage whose time is up closes before the message is judged
    round_ = db.get_round(conn, round_id)
    if round_.state != OPEN:
        raise SecAggRejected(WRONG_STAGE, f"round {round_id} is {round_.state}: its stages are over")
    if isinstance(message, KeyAdvertisement):
        cohort, before = _open_cohort(conn, round_id, seen_for=(message.mask_key, message.share_key))
        act = cohort.advertise
    elif isinstance(message, ShareUpload):
        cohort, before = _open_cohort(conn, round_id, boxes=device_id)
        act = cohort.receive_shares
    elif isinstance(message, UnmaskResponse):
        cohort, before = _open_cohort(conn, round_id, answers=device_id)
        act = cohort.receive_unmask
    else:
        raise TypeError(f"not a SecAgg message: {type(message).__name__}")
    try:
        act(device_id, message)
    except CohortAbandoned as err:
        raise SecAggRejected(WRONG_STAGE, f"round {round_id} was abandoned ({err.reason})") from None
    store.save(conn, cohort, before, now)
    advance(conn, round_id, now)


def accept_input(conn, round_: RoundRecord, device_id: str, values, now: float) -> None:
    """Record one device's masked input as accepted (its sha256: U3 while input is open). The caller
    inserts the upload's row in the same transaction, then calls `advance` (input may be complete);
    the worker folds the blob into the round's running sum.

    Raises:
        SecAggRejected: `wrong_stage` (input is not open), `not_in_cohort` (not in U2),
            `length_mismatch`, `bad_input`, `conflicting_input`.
    """
    cohort, before = _open_cohort(conn, round_.id)
    try:
        cohort.fold(device_id, values)  # its checks; the sum it adds to is a scratch one
    except CohortAbandoned as err:
        raise SecAggRejected(WRONG_STAGE, f"round {round_.id} was abandoned ({err.reason})") from None
    store.save(conn, cohort, before, now)


def input_lost(conn, round_: RoundRecord, device_id: str, now: float) -> None:
    """An accepted masked input no longer folds (its blob was damaged on disk and quarantined).
    While input is open the device counts as not having uploaded; later its masks are in the
    unmask requests already, so no sum can be rebuilt: the round is abandoned (`secagg_unfoldable`)."""
    row = store.cohort_row(conn, round_.id)
    if row is None or row.stage == ABANDONED:
        return
    if row.stage == INPUT:
        conn.execute("UPDATE secagg_devices SET input_sha256 = NULL WHERE round_id = ? AND device_id = ?",
                     (round_.id, device_id))
    elif round_.state in (OPEN, CLOSING):
        abandon(conn, round_, UNFOLDABLE, f"the accepted masked input of {device_id!r} no longer folds", now)


def assigning(conn, round_id: int) -> bool:
    """Whether the round still hands out tasks: only while advertising (U1 is fixed when it closes)."""
    row = store.cohort_row(conn, round_id)
    return row is not None and row.stage == ADVERTISING


def status(conn, round_id: int, device_id: str, *, retry_after: float) -> SecAggStatus:
    """What `device_id` must do now in the round (docs/secure_aggregation.md, `SecAggStatus`)."""
    round_, row = db.get_round(conn, round_id), store.cohort_row(conn, round_id)
    if round_.state == ROUND_ABANDONED or row.stage == ABANDONED:
        return SecAggStatus(round_id, ABANDONED, "dropped", reason=row.abandoned_reason or round_.outcome)
    if round_.state != OPEN or row.stage == DONE:
        return SecAggStatus(round_id, FINISHED, "done")
    stage = row.stage

    def dropped(reason: str) -> SecAggStatus:
        return SecAggStatus(round_id, stage, "dropped", reason=reason)

    wait = SecAggStatus(round_id, stage, "wait", retry_after=retry_after)
    if stage == ADVERTISING:
        return wait
    member = store.device_row(conn, round_id, device_id)
    if member is None:
        return dropped(MISSED_ADVERTISING)
    if stage == SHARING:
        if member["shared"]:
            return wait
        cohort, _ = store.load(conn, round_id)
        return SecAggStatus(round_id, stage, "share", neighbours=cohort.neighbour_list(device_id))
    if not member["in_u2"]:
        return dropped(PRUNED if member["shared"] else MISSED_SHARING)
    if stage == INPUT:
        if member["input_sha256"] is not None:
            return wait
        cohort, _ = store.load(conn, round_id, boxes=device_id)
        return SecAggStatus(round_id, stage, "upload", inbox=cohort.inbox(device_id))
    if not member["in_u3"]:
        return dropped(MISSED_INPUT)
    if member["answered"]:
        return wait
    cohort, _ = store.load(conn, round_id)
    return SecAggStatus(round_id, stage, "unmask", unmask=cohort.unmask_request(device_id))


def status_json(conn, round_: RoundRecord) -> dict | None:
    """The operator's view of a SecAgg round: stage, its deadline, devices per stage, k, t, r."""
    row = store.cohort_row(conn, round_.id)
    if row is None:
        return None
    live = row.final_counts is None  # until the round ends; then the counts frozen by `forget`
    return {"stage": FINISHED if row.stage == DONE else row.stage, "stage_started_at": row.stage_started_at,
            "stage_deadline": stage_deadline(row, round_) if row.stage in OPEN_STAGES else None,
            "counts": store.counts(conn, round_.id) if live else json.loads(row.final_counts or "null"),
            "degree": row.degree, "threshold": row.threshold, "modulus_bits": row.modulus_bits,
            "vector_length": row.vector_length, "tolerated_dropout": row.tolerated_dropout,
            "abandoned_reason": row.abandoned_reason}
