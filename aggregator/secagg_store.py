"""A SecAgg round's cohort in SQLite: a row per device, per sealed box and per answer, never one blob.

docs/secure_aggregation.md, "Over HTTP". Tables (created with the rest of the schema, db.py):

    secagg_cohorts    a row per SecAgg round: its parameters, stage, when the stage began, the
                      graph seed, k and t once advertising closed, why it was abandoned, and the
                      stage counts frozen when the round ended
    secagg_devices    a row per device of U1: both public keys, `shared` (its ShareUpload arrived),
                      `in_u2`, `input_sha256` (its masked input was accepted: U3 while input is
                      open), `in_u3`, `unmask_response` (its shares, the UnmaskResponse's JSON)
    secagg_boxes      a row per sealed box (sender → recipient), deleted when input closes
    secagg_seen_keys  sha256 of every public key of an ended round (a key seen again: `reused_key`)

`load` rebuilds an `aggregator.secagg_cohort.SecAggCohort` from the rows one call needs: the keys,
the graph (recomputed from its seed), the stage sets, and boxes and answers only for the device a
message concerns (all of them only to close a stage), so a message costs O(cohort) row reads, not
O(boxes). `save` writes what the call changed, found by comparing the cohort with what was loaded
(`Loaded`): new keys, boxes, stage sets, digests, answers, the stage. Both run in the caller's
write transaction, so nothing a device is told depends on state not committed with it. What the
rows never hold: a device's input, masked or not (masked inputs are blobs the folder adds to the
round's running sum, aggregator/masked_sum.py), or a private key.

`forget` ends a round's secrets: the keys (their hashes go to `secagg_seen_keys`), boxes and
answers are deleted; the cohort row stays with its final counts for the operator.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from aggregator.secagg_cohort import (ABANDONED, ADVERTISING, DONE, INPUT, UNMASKING, CohortState, SecAggCohort,
                                      key_hash)
from fedkb_core.secagg import graph
from fedkb_core.secagg.messages import UnmaskResponse

SCHEMA = """
CREATE TABLE IF NOT EXISTS secagg_cohorts (
    round_id INTEGER PRIMARY KEY,
    stage TEXT NOT NULL,
    stage_started_at REAL NOT NULL,
    stage_timeout REAL NOT NULL,
    vector_length INTEGER NOT NULL,
    modulus_bits INTEGER NOT NULL,
    min_survivors INTEGER NOT NULL,
    tolerated_dropout REAL NOT NULL,
    requested_degree INTEGER,
    graph_seed BLOB,
    degree INTEGER,
    threshold INTEGER,
    abandoned_reason TEXT,
    abandoned_message TEXT,
    final_counts TEXT
);
CREATE TABLE IF NOT EXISTS secagg_devices (
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    mask_key BLOB NOT NULL,
    share_key BLOB NOT NULL,
    shared INTEGER NOT NULL DEFAULT 0,
    in_u2 INTEGER NOT NULL DEFAULT 0,
    input_sha256 TEXT,
    in_u3 INTEGER NOT NULL DEFAULT 0,
    unmask_response TEXT,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS secagg_boxes (
    round_id INTEGER NOT NULL,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    box BLOB NOT NULL,
    PRIMARY KEY (round_id, recipient, sender)
);
CREATE INDEX IF NOT EXISTS secagg_boxes_by_sender ON secagg_boxes (round_id, sender);
CREATE TABLE IF NOT EXISTS secagg_seen_keys (
    key_hash BLOB PRIMARY KEY,
    round_id INTEGER NOT NULL
);
"""

# What `load` reads of boxes and answers: none, every one, or one device's.
NONE, ALL = "none", "all"


@dataclasses.dataclass(frozen=True)
class CohortRow:
    """The round's row of `secagg_cohorts`."""

    round_id: int
    stage: str
    stage_started_at: float
    stage_timeout: float
    vector_length: int
    modulus_bits: int
    min_survivors: int
    tolerated_dropout: float
    requested_degree: int | None
    graph_seed: bytes | None
    degree: int | None
    threshold: int | None
    abandoned_reason: str | None
    abandoned_message: str | None
    final_counts: str | None


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What `load` read, so `save` writes only the difference."""

    stage: str
    keys: frozenset
    shared: frozenset
    u2: frozenset
    folded: frozenset
    u3: frozenset
    responses: frozenset


def insert_cohort(conn, round_id: int, *, vector_length: int, modulus_bits: int, min_survivors: int,
                  tolerated_dropout: float, degree: int | None, stage_timeout: float, now: float) -> None:
    """A new round's cohort, at stage advertising (in the transaction that inserts the round)."""
    conn.execute("INSERT INTO secagg_cohorts (round_id, stage, stage_started_at, stage_timeout, vector_length,"
                 " modulus_bits, min_survivors, tolerated_dropout, requested_degree)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (round_id, ADVERTISING, now, stage_timeout, vector_length, modulus_bits, min_survivors,
                  float(tolerated_dropout), degree))


def cohort_row(conn, round_id: int) -> CohortRow | None:
    row = conn.execute("SELECT * FROM secagg_cohorts WHERE round_id = ?", (round_id,)).fetchone()
    return None if row is None else CohortRow(**{f.name: row[f.name] for f in dataclasses.fields(CohortRow)})


def device_row(conn, round_id: int, device_id: str):
    """The device's row (`shared`, `in_u2`, `input_sha256`, `in_u3`, whether it answered), or None."""
    return conn.execute("SELECT device_id, shared, in_u2, input_sha256, in_u3, unmask_response IS NOT NULL AS answered"
                        " FROM secagg_devices WHERE round_id = ? AND device_id = ?", (round_id, device_id)).fetchone()


def counts(conn, round_id: int) -> dict[str, int]:
    """Devices per stage: advertised (|U1|), shared, u2, uploaded (masked inputs accepted), u3, unmasked."""
    row = conn.execute("SELECT COUNT(*), TOTAL(shared), TOTAL(in_u2), COUNT(input_sha256), TOTAL(in_u3),"
                       " COUNT(unmask_response) FROM secagg_devices WHERE round_id = ?", (round_id,)).fetchone()
    return dict(zip(("advertised", "shared", "u2", "uploaded", "u3", "unmasked"), (int(v) for v in row)))


@functools.lru_cache(maxsize=4)
def _neighbour_table(ids: tuple[str, ...], degree: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """N(u) by id, as `SecAggCohort.close_advertising` drew it (node i − 1 is the device of index i)."""
    table = graph.neighbours(len(ids), degree, seed)
    return {ids[i]: tuple(sorted(ids[j] for j in row)) for i, row in enumerate(table)}


def _seen(conn, keys) -> set[bytes]:
    """Which of `keys` were advertised in an ended round (their sha256s, as the cohort's seen_keys)."""
    hashes = [key_hash(k) for k in keys]
    marks = ",".join("?" * len(hashes))
    return {bytes(r[0]) for r in conn.execute(f"SELECT key_hash FROM secagg_seen_keys WHERE key_hash IN ({marks})",
                                              hashes)} if hashes else set()


def load(conn, round_id: int, *, boxes: str = NONE, answers: str = NONE, seen_for: tuple[bytes, ...] = (),
         running_sum: np.ndarray | None = None) -> tuple[SecAggCohort, Loaded] | None:
    """The round's cohort as far as one call needs it, and what was read (for `save`).

    Args:
        boxes: NONE, ALL, or a device id: the boxes that device sent (stage sharing: its retry is
            compared with them) or, once sharing closed, the boxes sealed to it (its inbox).
        answers: NONE, ALL, or a device id: the unmask answers to read.
        seen_for: public keys to look up among earlier rounds' (an advertisement's two keys).
        running_sum: the folder's Σ y mod 2^r (to unmask); None: zeros, which only `fold`'s
            checks touch (a request never sums).

    Returns:
        None when the round has no cohort row (not a SecAgg round).
    """
    row = cohort_row(conn, round_id)
    if row is None:
        return None
    devices = conn.execute("SELECT device_id, mask_key, share_key, shared, in_u2, input_sha256, in_u3 FROM"
                           " secagg_devices WHERE round_id = ? ORDER BY device_id", (round_id,)).fetchall()
    keys = {d["device_id"]: (bytes(d["mask_key"]), bytes(d["share_key"])) for d in devices}
    indices, neighbours = {}, {}
    if row.graph_seed is not None:
        ids = tuple(sorted(keys))
        indices = {d: i + 1 for i, d in enumerate(ids)}
        neighbours = {d: list(v) for d, v in _neighbour_table(ids, row.degree, bytes(row.graph_seed)).items()}
    uploads: dict[str, dict[str, bytes]] = {}
    if boxes != NONE and row.stage not in (UNMASKING, DONE, ABANDONED):
        if boxes == ALL:
            query, args = "SELECT sender, recipient, box FROM secagg_boxes WHERE round_id = ?", (round_id,)
        elif row.stage == INPUT:
            query, args = ("SELECT sender, recipient, box FROM secagg_boxes WHERE round_id = ? AND recipient = ?",
                           (round_id, boxes))
        else:
            query, args = ("SELECT sender, recipient, box FROM secagg_boxes WHERE round_id = ? AND sender = ?",
                           (round_id, boxes))
        for b in conn.execute(query, args):
            uploads.setdefault(b["sender"], {})[b["recipient"]] = bytes(b["box"])
    responses = {}
    if answers != NONE:
        query = ("SELECT device_id, unmask_response FROM secagg_devices"
                 " WHERE round_id = ? AND unmask_response IS NOT NULL")
        args = (round_id,) if answers == ALL else (round_id, answers)
        if answers != ALL:
            query += " AND device_id = ?"
        responses = {r["device_id"]: UnmaskResponse.from_json(json.loads(r["unmask_response"]))
                     for r in conn.execute(query, args)}
    state = CohortState(
        round_id=round_id, vector_length=row.vector_length, modulus_bits=row.modulus_bits,
        min_survivors=row.min_survivors, tolerated_dropout=row.tolerated_dropout,
        requested_degree=row.requested_degree, stage=row.stage, keys=keys,
        graph_seed=None if row.graph_seed is None else bytes(row.graph_seed), degree=row.degree,
        threshold=row.threshold, indices=indices, neighbours=neighbours,
        shared=[d["device_id"] for d in devices if d["shared"]], uploads=uploads,
        u2=[d["device_id"] for d in devices if d["in_u2"]],
        folded={d["device_id"]: d["input_sha256"] for d in devices if d["input_sha256"] is not None},
        u3=[d["device_id"] for d in devices if d["in_u3"]], responses=responses,
        abandoned_reason=row.abandoned_reason, abandoned_message=row.abandoned_message)
    if running_sum is None:
        running_sum = np.zeros(row.vector_length, np.uint32)
    cohort = SecAggCohort.from_json(state.to_json(), running_sum, seen_keys=_seen(conn, seen_for))
    return cohort, _snapshot(cohort.state)


def _snapshot(s: CohortState) -> Loaded:
    return Loaded(stage=s.stage, keys=frozenset(s.keys), shared=frozenset(s.shared), u2=frozenset(s.u2),
                  folded=frozenset(s.folded), u3=frozenset(s.u3), responses=frozenset(s.responses))


def save(conn, cohort: SecAggCohort, before: Loaded, now: float) -> None:
    """Write what changed in `cohort` since `load` read `before` (a new stage starts its clock now)."""
    s, rid = cohort.state, cohort.round_id
    conn.executemany("INSERT INTO secagg_devices (round_id, device_id, mask_key, share_key) VALUES (?, ?, ?, ?)",
                     [(rid, d, *s.keys[d]) for d in sorted(s.keys.keys() - before.keys)])
    for d in sorted(set(s.shared) - before.shared):
        conn.execute("UPDATE secagg_devices SET shared = 1 WHERE round_id = ? AND device_id = ?", (rid, d))
        conn.executemany("INSERT INTO secagg_boxes (round_id, recipient, sender, box) VALUES (?, ?, ?, ?)",
                         [(rid, r, d, box) for r, box in sorted(s.uploads[d].items())])
    conn.executemany("UPDATE secagg_devices SET in_u2 = 1 WHERE round_id = ? AND device_id = ?",
                     [(rid, d) for d in sorted(set(s.u2) - before.u2)])
    conn.executemany("UPDATE secagg_devices SET input_sha256 = ? WHERE round_id = ? AND device_id = ?",
                     [(s.folded[d], rid, d) for d in sorted(s.folded.keys() - before.folded)])
    conn.executemany("UPDATE secagg_devices SET in_u3 = 1 WHERE round_id = ? AND device_id = ?",
                     [(rid, d) for d in sorted(set(s.u3) - before.u3)])
    conn.executemany("UPDATE secagg_devices SET unmask_response = ? WHERE round_id = ? AND device_id = ?",
                     [(json.dumps(s.responses[d].to_json(), sort_keys=True), rid, d)
                      for d in sorted(s.responses.keys() - before.responses)])
    if s.stage != before.stage:
        set_stage(conn, rid, s.stage, now, graph_seed=s.graph_seed, degree=s.degree, threshold=s.threshold,
                  abandoned_reason=s.abandoned_reason, abandoned_message=s.abandoned_message)


def set_stage(conn, round_id: int, stage: str, now: float, **columns) -> None:
    """Move the cohort to `stage` (its clock restarts); boxes go once input closed (delivered)."""
    extra = "".join(f", {name} = ?" for name in columns)
    conn.execute(f"UPDATE secagg_cohorts SET stage = ?, stage_started_at = ?{extra} WHERE round_id = ?",
                 (stage, now, *columns.values(), round_id))
    if stage in (UNMASKING, DONE, ABANDONED):
        conn.execute("DELETE FROM secagg_boxes WHERE round_id = ?", (round_id,))


def forget(conn, round_id: int) -> None:
    """The round ended: keep its final counts and its keys' hashes (for `reused_key`), delete the
    keys, boxes and answers (shares)."""
    conn.execute("UPDATE secagg_cohorts SET final_counts = ? WHERE round_id = ?",
                 (json.dumps(counts(conn, round_id)), round_id))
    hashes = [(key_hash(bytes(k)), round_id) for r in conn.execute(
        "SELECT mask_key, share_key FROM secagg_devices WHERE round_id = ?", (round_id,)) for k in r]
    conn.executemany("INSERT OR IGNORE INTO secagg_seen_keys (key_hash, round_id) VALUES (?, ?)", hashes)
    conn.execute("DELETE FROM secagg_devices WHERE round_id = ?", (round_id,))
    conn.execute("DELETE FROM secagg_boxes WHERE round_id = ?", (round_id,))
