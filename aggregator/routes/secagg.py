"""Secure aggregation's stage endpoints (docs/secure_aggregation.md, "Over HTTP"); device token.

    POST /v1/rounds/<id>/secagg/keys     KeyAdvertisement -> SecAggStatus
    GET  /v1/rounds/<id>/secagg          -> SecAggStatus: what this device must do now
    POST /v1/rounds/<id>/secagg/shares   ShareUpload -> SecAggStatus
    POST /v1/rounds/<id>/secagg/unmask   UnmaskResponse -> SecAggStatus

(the masked input goes to the upload route, aggregator/routes/training.py). Every POST is one
write through the app's `GroupCommit`: the stage's clock is checked, the message applied by the
cohort, the stage closed if that completed it, and the answer computed, in one transaction
(aggregator/secagg_stages.py), so a device is never told something that is not committed.
Retries of an accepted message are answered again; a different message at a stage already
answered is 409 `secagg_conflict`; a message for another stage 409 `secagg_wrong_stage` (also a
round without secure aggregation, or one that is over); anything else the cohort refuses is 400
with its `SecAggRejected.code`; a device without a task in the round 403 `no_task`. A refused
message changes nothing but the rejection counters.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, jsonify, request

from aggregator import db, rounds, secagg_stages
from aggregator.errors import ApiError, BadRequest, Conflict, Forbidden, NotFound
from aggregator.routes import authenticate_device, json_body, server
from aggregator.secagg_cohort import (CONFLICTING_ADVERTISEMENT, CONFLICTING_INPUT, CONFLICTING_RESPONSE,
                                      CONFLICTING_UPLOAD, WRONG_STAGE, SecAggRejected)
from fedkb_core.protocol import ProtocolError
from fedkb_core.secagg.messages import KeyAdvertisement, ShareUpload, UnmaskResponse

bp = Blueprint("secagg", __name__)
log = logging.getLogger(__name__)

WRONG_STAGE_CODE, CONFLICT_CODE = "secagg_wrong_stage", "secagg_conflict"
_CONFLICTS = (CONFLICTING_ADVERTISEMENT, CONFLICTING_UPLOAD, CONFLICTING_INPUT, CONFLICTING_RESPONSE)


def rejection_error(err: SecAggRejected) -> ApiError:
    """The HTTP answer to a message the cohort refused (also for the upload route's masked input)."""
    if err.code == WRONG_STAGE:
        return Conflict(err.message, code=WRONG_STAGE_CODE)
    if err.code in _CONFLICTS:
        return Conflict(f"{err.code}: {err.message}", code=CONFLICT_CODE)
    return BadRequest(err.message, code=err.code)


def _device_in_round(round_id: int) -> tuple[str, object]:
    """The device and its SecAgg round, or the refusal (401, 404 `unknown_round`, 409, 403 `no_task`)."""
    device_id = authenticate_device()
    conn = db.get_db()
    round_ = db.get_round(conn, round_id)
    if round_ is None:
        raise NotFound(f"round {round_id} does not exist", code="unknown_round")
    if not round_.secure:
        raise Conflict(f"round {round_id} does not run secure aggregation", code=WRONG_STAGE_CODE)
    if db.task_of(conn, round_id, device_id) is None:
        raise Forbidden(f"device {device_id} holds no task for round {round_id}", code="no_task")
    return device_id, round_


def _retry_after() -> float:
    """How long a waiting device waits: a tenth of a stage's timeout, at most the usual retry-after."""
    cfg = server().config
    return rounds.retry_after(min(cfg.retry_after, cfg.secagg_stage_seconds / 10.0), cfg.retry_jitter, server().rng)


def _answer(status):
    return jsonify(status.to_json())


@bp.get("/v1/rounds/<int:round_id>/secagg")
def secagg_status(round_id: int):
    """This device's next step in the round (closing a stage first if its time is up).

    :raise 401: missing or wrong device token. :raise 403: `no_task`. :raise 404: `unknown_round`.
    :raise 409: `secagg_wrong_stage` (not a SecAgg round).
    """
    device_id, _ = _device_in_round(round_id)
    state, now, retry = server(), time.time(), _retry_after()
    if secagg_stages.due(db.get_db(), round_id, now):
        def advance_then_answer(c):
            secagg_stages.advance(c, round_id, now)
            return secagg_stages.status(c, round_id, device_id, retry_after=retry)

        status = state.commits.run(advance_then_answer)
        state.worker.wake()
    else:
        conn = db.get_db()
        conn.execute("BEGIN")  # one read snapshot (WAL): the round, the cohort and the device agree
        try:
            status = secagg_stages.status(conn, round_id, device_id, retry_after=retry)
        finally:
            conn.execute("COMMIT")
    return _answer(status)


def _post(round_id: int, kind, what: str):
    device_id, _ = _device_in_round(round_id)
    state, now, retry = server(), time.time(), _retry_after()
    try:
        message = kind.from_json(json_body())

        def apply(c):
            secagg_stages.receive(c, round_id, device_id, message, now)
            return secagg_stages.status(c, round_id, device_id, retry_after=retry)

        try:
            status = state.commits.run(apply)
        except SecAggRejected as err:
            raise rejection_error(err) from None
    except (ApiError, ProtocolError) as err:  # a malformed message is 400 `bad_request` (the app's handler)
        _count_rejection(round_id, getattr(err, "code", "bad_request"))
        raise
    state.worker.wake()
    log.info("secure aggregation message", extra={"round_id": round_id, "device_id": device_id, "secagg_message": what,
                                                   "stage": status.stage, "action": status.action})
    return _answer(status)


def _count_rejection(round_id: int, code: str) -> None:
    try:
        size = len(request.get_data(cache=True))  # what was read (the JSON parser read it all), never a claim
    except Exception:  # a body refused before it was read
        size = 0
    try:
        server().commits.run(lambda c: db.count_rejection(c, round_id, code, size))
    except Exception:  # counting must never turn a 4xx into a 500
        log.exception("could not count a rejection")
    log.info("secure aggregation message refused", extra={"round_id": round_id, "reason": code})


@bp.post("/v1/rounds/<int:round_id>/secagg/keys")
def secagg_keys(round_id: int):
    """Stage 0: the device's two public keys (`KeyAdvertisement`). Idempotent for the same keys.

    :raise 400: not a `KeyAdvertisement`, or the cohort's code (`round_mismatch`, `duplicate_key`,
        `bad_key`, `reused_key`, `cohort_full`, `bad_device_id`).
    :raise 401, 403 (`no_task`), 404 (`unknown_round`).
    :raise 409: `secagg_conflict` (other keys already advertised), `secagg_wrong_stage`.
    """
    return _post(round_id, KeyAdvertisement, "keys")


@bp.post("/v1/rounds/<int:round_id>/secagg/shares")
def secagg_shares(round_id: int):
    """Stage 1: one sealed box per neighbour (`ShareUpload`). Idempotent for the same boxes.

    :raise 400: not a `ShareUpload`, or `not_in_cohort`, `round_mismatch`, `wrong_recipients`, `bad_box`.
    :raise 401, 403 (`no_task`), 404 (`unknown_round`).
    :raise 409: `secagg_conflict` (other boxes already sent), `secagg_wrong_stage`.
    """
    return _post(round_id, ShareUpload, "shares")


@bp.post("/v1/rounds/<int:round_id>/secagg/unmask")
def secagg_unmask(round_id: int):
    """Stage 3: the shares the device's `UnmaskRequest` asked for (`UnmaskResponse`). Idempotent.

    :raise 400: not an `UnmaskResponse`, or `not_in_cohort`, `round_mismatch`, `wrong_shares`, `bad_share`.
    :raise 401, 403 (`no_task`), 404 (`unknown_round`).
    :raise 409: `secagg_conflict` (other shares already answered), `secagg_wrong_stage`.
    """
    return _post(round_id, UnmaskResponse, "unmask")
