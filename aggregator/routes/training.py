"""Training traffic: check-in (a task or "come back later") and update uploads.

Upload validation runs in this order, every step before any maths and before any state changes:
bearer auth → round exists → the device holds a task for it → Content-Length within the bound
(413 before reading) → an identical retry of an accepted update answers `duplicate` → the round is
still accepting → `fedkb_core.wire.decode_update` (the round's encoding, bits and rotation seed, names,
shapes, dtypes, finiteness, example count) →
metadata names this round, this device and the round's model version → the norm is measured
(the folder re-clips to the round's clip norm) → the body is written durably and recorded in one
transaction. A rejection changes nothing but the rejection counters.

The body's content digest (sha256 of 4 MB, ~2 ms) is computed only when it is needed: to compare
with an accepted update of the same device, or to record an update that passed validation.
Writes go through the app's `db.GroupCommit`, so concurrent accepts share one commit.

A secure-aggregation round (docs/secure_aggregation.md) hands out tasks only while its cohort is
advertising (U1 is fixed when advertising closes), never reclaims a slot (a device waits for the
stages before it can upload; its `report_by` is the round's deadline), and takes a masked upload
(`fedkb_core.secagg.masked_wire`): its header is checked against the round's modulus and vector
length, the cohort accepts it (input open, the device in U2, values below 2^r) in the transaction
that records it, with no example count or norm (stored as 0: the server has none), and that
transaction closes the input stage once it is complete (aggregator/secagg_stages.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time

from flask import Blueprint, jsonify, request

from aggregator import db, rounds, secagg_stages
from aggregator.limits import update_size_limit
from fedkb_core.secagg.masked_wire import decode_masked
from aggregator.min_separation import MinSeparation
from aggregator.errors import ApiError, BadRequest, Conflict, Forbidden, LengthRequired, NotFound, PayloadTooLarge
from fedkb_core.clipping import global_norm, squared_norm
from aggregator.folding import write_blob
from aggregator.routes import authenticate_device, json_body, server
from aggregator.routes.secagg import rejection_error
from aggregator.secagg_cohort import SecAggRejected
from fedkb_core.protocol import CheckinRequest, CheckinResponse, UploadResponse, to_json
from fedkb_core.update_encoding import HADAMARD
from fedkb_core.wire import UpdateRejected, decode_rotated, decode_update, read_header

bp = Blueprint("training", __name__)
log = logging.getLogger(__name__)


@bp.post("/v1/checkin")
def checkin():
    """Give an eligible device a task for the open round, or a jittered retry-after.

    :raise 400: the body is not a `CheckinRequest`.
    :raise 401: missing or wrong device token.
    """
    device_id = authenticate_device()
    CheckinRequest.from_json(json_body())  # validated; the state is not used for selection yet
    state, conn, now = server(), db.get_db(), time.time()

    def decide(c, round_):
        """(decision, the device's report-by time if it holds a task)."""
        if round_ is None:
            return rounds.checkin_decision(None, has_task=False, has_submitted=False, now=now), None
        task = db.task_of(c, round_.id, device_id)
        verdict = rounds.checkin_decision(
            round_, has_task=task is not None and task["reclaimed_at"] is None,
            task_reclaimed=task is not None and task["reclaimed_at"] is not None,
            has_submitted=db.find_update(c, round_.id, device_id) is not None, now=now)
        if verdict == "assign" and not _separated_enough(c, state.config, round_, device_id):
            verdict = "min_separation"
        if verdict == "assign" and round_.secure and not secagg_stages.assigning(c, round_.id):
            verdict = "round_full"  # the cohort is fixed: a new device could not take part
        return verdict, None if task is None else task["report_by"]

    def assign(c):  # re-decide under the write lock: the last free slot may be gone
        fresh = db.active_round(c)
        if fresh is not None and fresh.assigned >= fresh.max_assigned and not fresh.secure:
            reclaimed = db.reclaim_overdue_tasks(c, fresh.id, now)
            if reclaimed:
                log.info("task slots reclaimed", extra={"round_id": fresh.id, "tasks": reclaimed})
                fresh = db.get_round(c, fresh.id)
        verdict, report_by = decide(c, fresh)
        if verdict == "assign":
            window = state.config.task_report_window
            report_by = fresh.deadline if fresh.secure else rounds.report_by(fresh, now, window)
            db.add_task(c, fresh.id, device_id, report_by)
        return fresh, verdict, report_by

    round_ = db.active_round(conn)
    decision, report_by = decide(conn, round_)
    if decision == "round_full" and not round_.secure and db.has_overdue_tasks(conn, round_.id, now):
        decision = "assign"  # a silent device's slot is free for the taking
    if decision == "assign":
        round_, decision, report_by = state.commits.run(assign)
    if decision in ("assign", "train"):
        return jsonify(to_json(CheckinResponse("train", task=round_.task(report_by=report_by))))
    cfg = state.config
    response = rounds.wait_response(decision, base=cfg.retry_after, jitter=cfg.retry_jitter, rng=state.rng)
    out = jsonify(to_json(response))
    out.headers["Retry-After"] = str(max(1, round(response.retry_after)))
    return out


def _separated_enough(conn, config, round_, device_id: str) -> bool:
    """DP-FTRL's minimum separation: at least `dp_min_separation` releases between the last release
    this device contributed to and this round's (aggregator/min_separation.py)."""
    if not (config.dp_enabled and config.dp_mechanism == "ftrl" and config.dp_min_separation):
        return True
    last = db.last_contribution(conn, device_id)
    if last is None:
        return True
    return MinSeparation(config.dp_min_separation).allows([db.releases_before(conn, last)],
                                                          db.releases_before(conn, round_.id))


@bp.post("/v1/rounds/<int:round_id>/updates")
def upload(round_id: int):
    """Accept one device's update for one round (idempotent per device and round).

    :raise 400: malformed body or metadata (`malformed_update`, `weight_mismatch`, `non_finite`,
        `bad_num_examples`, `bad_encoding`, `bad_bits`, `encoding_mismatch`, `bits_mismatch`,
        `seed_mismatch`, `length_mismatch`, `round_mismatch`, `device_mismatch`).
    :raise 401: missing or wrong device token (`unauthorized`).
    :raise 403: the device holds no task for this round (`no_task`).
    :raise 404: no such round (`unknown_round`).
    :raise 409: `round_closed`, `stale_model_version`, `already_submitted` (a different body), or
        `task_expired` (the device let its task's report-by time pass and its slot was reclaimed).
    :raise 411/413: no Content-Length (`length_required`) or too large (`payload_too_large`).
    """
    start = time.perf_counter()
    state, conn = server(), db.get_db()
    known_round = 0  # rejections against an unknown round are counted under round 0
    body = b""  # what was actually read: the only byte count a rejection adds (never the claim)
    try:
        device_id = authenticate_device()
        round_ = db.get_round(conn, round_id)
        if round_ is None:
            raise NotFound(f"round {round_id} does not exist", code="unknown_round")
        known_round = round_id
        task = db.task_of(conn, round_id, device_id)
        if task is None:
            raise Forbidden(f"device {device_id} holds no task for round {round_id}", code="no_task")
        if task["reclaimed_at"] is not None:
            raise _task_expired(round_id, task)
        body = _read_bounded_body(update_size_limit(state.config, sum(w.size for w in state.store.specs(round_.model_version))))
        if len(body) != request.content_length:
            raise BadRequest(f"body ended after {len(body)} of {request.content_length} bytes", code="malformed_update")

        existing = db.find_update(conn, round_id, device_id)
        if existing is not None:
            return _duplicate(existing, _content_digest(body))
        if not round_.accepting(time.time()):
            raise Conflict(f"round {round_id} no longer accepts updates", code="round_closed")

        specs = state.store.specs(round_.model_version)
        if round_.secure:
            grid = round_.secagg_grid(sum(s.size for s in specs))
            masked = decode_masked(body, modulus_bits=grid.modulus_bits, vector_length=grid.vector_length,
                                   tail_length=grid.tail_length)
            meta, norm = masked, None  # a masked vector has no norm the server could measure
        else:
            masked = None
            meta, norm = _validate(body, specs, round_)
        if meta.round_id != round_id:
            raise UpdateRejected("round_mismatch", f"update is for round {meta.round_id}, posted to round {round_id}")
        if meta.device_id != device_id:
            raise UpdateRejected("device_mismatch", f"update names device {meta.device_id!r}, token is {device_id!r}")
        if meta.model_version != round_.model_version:
            raise UpdateRejected("stale_model_version",
                                 f"update is against version {meta.model_version}, round {round_id} trains "
                                 f"version {round_.model_version}")
        body_sha256 = _content_digest(body)
        try:
            if masked is not None:  # nothing about one device's update but the masked vector itself
                update_id = _accept(state, round_id, device_id, body, body_sha256, 0, 0.0, 0.0, masked=masked.values)
            else:
                update_id = _accept(state, round_id, device_id, body, body_sha256, meta.num_examples, norm,
                                    meta.update_norm)
        except _Duplicate as twin:
            return _duplicate(twin.row, body_sha256)
    except (ApiError, UpdateRejected) as err:
        _count_rejection(conn, known_round, err.code, len(body))
        raise
    state.worker.wake()
    state.metrics.request_seconds.labels("upload").observe(time.perf_counter() - start)
    log.info("update accepted", extra={"round_id": round_id, "device_id": device_id, "update_id": update_id,
                                       "num_examples": getattr(meta, "num_examples", None),
                                       "update_norm": None if norm is None else round(norm, 6),
                                       "bytes": len(body), "ms": round(1000 * (time.perf_counter() - start), 2)})
    return jsonify(to_json(UploadResponse(status="accepted", update_id=update_id, update_norm=norm)))


def _validate(body: bytes, specs, round_) -> tuple:
    """(metadata, norm) of a body in the round's encoding; the norm is measured before the server's
    clipping, which the folder applies. A `hadamard` update is measured in the rotated domain, as
    the folder sums it (the same norm: the rotation is orthogonal), without the inverse rotation."""
    if round_.encoding == HADAMARD:
        update = decode_rotated(body, specs, max_examples=round_.max_examples, expected=round_.update_encoding)
        return update.metadata, math.sqrt(squared_norm(update.values))
    update = decode_update(body, specs, max_examples=round_.max_examples, expected=round_.update_encoding)
    return update.metadata, global_norm(update.deltas)


def _read_bounded_body(limit: int) -> bytes:
    """The body, read only once its declared length is within `limit`; shorter if the client
    stopped sending early (the caller compares)."""
    length = request.content_length
    if length is None:
        raise LengthRequired("an update needs a Content-Length header")
    if length > limit:
        raise PayloadTooLarge(f"update of {length} bytes exceeds this round's limit of {limit}")
    return _read_exactly(request.environ["wsgi.input"], length)


def _read_exactly(stream, length: int) -> bytes:
    """Read `length` bytes straight from the WSGI input, in few large reads.

    Werkzeug's `get_data` assembles the body from 64 KiB chunks in Python (about 7 ms for 4 MB,
    holding the GIL); the length is already checked against the bound, so reading the server's
    input stream directly is safe and several times cheaper.
    """
    parts, remaining = [], length
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _content_digest(body: bytes) -> str:
    """sha256 of an update's content: its tensor data plus its header with sorted keys.

    safetensors writes its metadata map in hash order, so two encodings of the same update can
    differ in bytes; a retry is recognized by what it says, not by how the header was ordered.
    """
    try:
        header, metadata, data_start = read_header(body)
    except UpdateRejected:
        return hashlib.sha256(body).hexdigest()
    canonical = json.dumps({"tensors": header, "metadata": metadata}, sort_keys=True).encode()
    digest = hashlib.sha256(canonical)
    digest.update(memoryview(body)[data_start:])
    return digest.hexdigest()


def _duplicate(existing, body_sha256: str):
    if existing["body_sha256"] != body_sha256:
        raise Conflict(f"device already submitted update {existing['id']} for round {existing['round_id']}",
                       code="already_submitted")
    norm = float(existing["update_norm"]) if existing["num_examples"] else None  # a masked input has none
    return jsonify(to_json(UploadResponse(status="accepted", update_id=int(existing["id"]), duplicate=True,
                                          update_norm=norm)))


def _accept(state, round_id, device_id, body, body_sha256, num_examples, norm, device_norm, *, masked=None) -> int:
    """Write the blob durably, then record it in a transaction that re-checks the round (and, for a
    SecAgg round's `masked` input, has the cohort accept it and closes the input stage if complete).

    The transaction is shared with concurrent accepts and check-ins (`db.GroupCommit`): it fsyncs
    the inbox folder (the blob's new name) and commits with a WAL fsync before `run` returns, so
    the caller answers "accepted" only for a durable blob named by a durable row.
    """
    try:
        blob = write_blob(state.config.state_dir, round_id, device_id, body, sync_dir=False)
    except FileNotFoundError:  # the round ended and its inbox was removed while we wrote
        raise Conflict(f"round {round_id} no longer accepts updates", code="round_closed") from None

    def record(c):
        fresh = db.get_round(c, round_id)
        if not fresh.accepting(time.time()):
            raise Conflict(f"round {round_id} no longer accepts updates", code="round_closed")
        task = db.task_of(c, round_id, device_id)
        if task["reclaimed_at"] is not None:  # its slot went to another device while we read the body
            raise _task_expired(round_id, task)
        twin = db.find_update(c, round_id, device_id)
        if twin is not None:  # a concurrent retry won the race: answer as its duplicate
            raise _Duplicate(twin)
        if fresh.secure:
            secagg_stages.accept_input(c, fresh, device_id, masked, time.time())
        update_id = db.add_update(c, round_id=round_id, device_id=device_id, num_examples=num_examples,
                                  update_norm=norm, device_norm=device_norm, body_sha256=body_sha256,
                                  size=len(body), blob=str(blob.relative_to(state.config.state_dir)))
        if fresh.secure:  # the stages decide when the round closes
            db.update_round(c, round_id, accepted=fresh.accepted + 1)
            secagg_stages.advance(c, round_id, time.time())
        else:
            db.update_round(c, round_id, accepted=fresh.accepted + 1, state=rounds.state_after_accept(fresh))
        return update_id

    try:
        return state.commits.run(record, sync_dirs=[blob.parent])
    except SecAggRejected as err:
        blob.unlink(missing_ok=True)
        raise rejection_error(err) from None
    except BaseException:
        blob.unlink(missing_ok=True)
        raise


def _task_expired(round_id: int, task) -> Conflict:
    return Conflict(f"the task for round {round_id} had to be reported by {task['report_by']:.0f} (unix time); "
                    "its slot went to another device", code="task_expired")


class _Duplicate(Exception):
    """Raised inside the accept transaction when a concurrent twin of this upload committed first."""

    def __init__(self, row):
        super().__init__(row["id"])
        self.row = row


def _count_rejection(conn, round_id: int, reason: str, size: int) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        server().commits.run(lambda c: db.count_rejection(c, round_id, reason, size))
    except Exception:  # counting must never turn a 4xx into a 500
        log.exception("could not count a rejection")
    log.info("update rejected", extra={"round_id": round_id, "reason": reason, "bytes": size})
