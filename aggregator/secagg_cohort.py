"""The server's side of one SecAgg+ round (docs/secure_aggregation.md, "Protocol logic"), as a pure
state machine: no Flask, no files, no clock. numpy and fedkb_core only.

    advertise(id, KeyAdvertisement)*   U1 = the devices whose keys arrived
    close_advertising(seed)            -> {id: NeighbourList}; the graph, indices 1..n by sorted id
    receive_shares(id, ShareUpload)*   one box per neighbour
    close_sharing()                    -> {id: ShareInbox}; U2 (pruned, below)
    fold(id, masked)*                  the running sum Σ y mod 2^r; U3 = devices folded
    close_input()                      -> {id: UnmaskRequest}
    receive_unmask(id, UnmaskResponse)*
    ready(), result()                  Σ_{U3} x mod 2^r

A message that breaks a rule raises `SecAggRejected` (a code and a message) and changes nothing; a
round that cannot finish raises `CohortAbandoned` (a reason code) from the call that finds it out,
and every later call raises it again. The mutable state is one `CohortState` (JSON-ready through
`to_json` / `from_json`) plus one uint32 array, the running sum, so a caller can persist a round
between any two calls and continue it in another process.

What the server holds never includes one device's input in the clear: a masked input is added
to the running sum as it arrives and is not kept (only its sha256, to tell a retry from a
conflicting upload); the sum of two or more masked inputs still carries their self masks until
`result`.

U2 pruning: a device that shared but has fewer than t neighbours that shared could never have its
secrets rebuilt if it dropped (and it would refuse its inbox: `too_few_neighbours`), so it is
dropped from U2, which may leave a neighbour of it below t in turn: the pruning repeats until every
device in U2 has at least t neighbours in U2 (a fixed point, the largest such subset). A pruned
device gets no inbox, its boxes are not delivered, and nobody masks with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from fedkb_core.secagg import graph, key_agreement, prg, shamir, share_box
from fedkb_core.secagg.integer_encoding import add_mod
from fedkb_core.secagg.messages import (MAX_COHORT, KeyAdvertisement, NeighbourEntry, NeighbourList, ShareInbox,
                                        ShareUpload, UnmaskRequest, UnmaskResponse, b64decode, b64encode, valid_id)

ADVERTISING, SHARING, INPUT, UNMASKING, DONE, ABANDONED = (
    "advertising", "sharing", "input", "unmasking", "done", "abandoned")
STAGES = (ADVERTISING, SHARING, INPUT, UNMASKING, DONE, ABANDONED)

# Rejection codes of one device's message (SecAggRejected.code).
WRONG_STAGE = "wrong_stage"
ROUND_MISMATCH = "round_mismatch"
BAD_DEVICE_ID = "bad_device_id"
COHORT_FULL = "cohort_full"
CONFLICTING_ADVERTISEMENT = "conflicting_advertisement"
DUPLICATE_KEY = "duplicate_key"
REUSED_KEY = "reused_key"
BAD_KEY = "bad_key"
NOT_IN_COHORT = "not_in_cohort"
WRONG_RECIPIENTS = "wrong_recipients"
BAD_BOX = "bad_box"
CONFLICTING_UPLOAD = "conflicting_upload"
LENGTH_MISMATCH = "length_mismatch"
BAD_INPUT = "bad_input"
CONFLICTING_INPUT = "conflicting_input"
WRONG_SHARES = "wrong_shares"
BAD_SHARE = "bad_share"
CONFLICTING_RESPONSE = "conflicting_response"
REJECTION_CODES = (WRONG_STAGE, ROUND_MISMATCH, BAD_DEVICE_ID, COHORT_FULL, CONFLICTING_ADVERTISEMENT, DUPLICATE_KEY,
                   REUSED_KEY, BAD_KEY, NOT_IN_COHORT, WRONG_RECIPIENTS, BAD_BOX, CONFLICTING_UPLOAD, LENGTH_MISMATCH,
                   BAD_INPUT, CONFLICTING_INPUT, WRONG_SHARES, BAD_SHARE, CONFLICTING_RESPONSE)

# Reasons a round is abandoned (CohortAbandoned.reason).
TOO_FEW_DEVICES = "too_few_devices"  # fewer than min_survivors advertised
IMPOSSIBLE_THRESHOLDS = "impossible_thresholds"  # graph.thresholds refuses n, degree, tolerated_dropout
TOO_FEW_SHARED = "too_few_shared"  # |U2| < min_survivors after pruning
TOO_FEW_INPUTS = "too_few_inputs"  # |U3| < min_survivors
TOO_FEW_SHARES = "too_few_shares"  # a secret the result needs has (or could get) fewer than t shares
INCONSISTENT_SHARES = "inconsistent_shares"  # shares off one polynomial, or a rebuilt key not the advertised one
ABANDON_REASONS = (TOO_FEW_DEVICES, IMPOSSIBLE_THRESHOLDS, TOO_FEW_SHARED, TOO_FEW_INPUTS, TOO_FEW_SHARES,
                   INCONSISTENT_SHARES)


class SecAggRejected(ValueError):
    """One device's message breaks a rule; refused without changing the round's state."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CohortAbandoned(Exception):
    """The round cannot produce a sum; `reason` is a stable code. `block_rms`: what a sum that
    overflowed its tuned grid measured (the next round's steps widen from it), else None."""

    def __init__(self, reason: str, message: str, block_rms: tuple[float, ...] | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.block_rms = block_rms


def key_hash(key: bytes) -> bytes:
    """What `seen_keys` holds: the sha256 digest of a raw public key."""
    return hashlib.sha256(key).digest()


def _box_bytes(round_id: int, sender: str, recipient: str) -> int:
    """The exact size of the box `sender` seals to `recipient` (share_box's layout)."""
    share = bytes(shamir.SHARE_BYTES)
    return share_box.NONCE_BYTES + share_box.TAG_BYTES + len(
        share_box.pack_shares(sender, recipient, round_id, share, share))


@dataclasses.dataclass
class CohortState:
    """Everything a round remembers; `to_json` / `from_json` round-trip it (the running sum
    travels beside it as one uint32 array)."""

    round_id: int
    vector_length: int
    modulus_bits: int
    min_survivors: int
    tolerated_dropout: float
    requested_degree: int | None
    stage: str = ADVERTISING
    keys: dict[str, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)  # U1: (mask key, share key)
    graph_seed: bytes | None = None
    degree: int | None = None  # k as built (min(requested or default, n − 1))
    threshold: int | None = None
    indices: dict[str, int] = dataclasses.field(default_factory=dict)
    neighbours: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    shared: list[str] = dataclasses.field(default_factory=list)  # whose ShareUpload arrived, in order
    uploads: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=dict)  # sender → recipient → box
    u2: list[str] = dataclasses.field(default_factory=list)
    folded: dict[str, str] = dataclasses.field(default_factory=dict)  # U3 while open: id → sha256 of y
    u3: list[str] = dataclasses.field(default_factory=list)
    responses: dict[str, UnmaskResponse] = dataclasses.field(default_factory=dict)
    abandoned_reason: str | None = None
    abandoned_message: str | None = None

    def to_json(self) -> dict:
        return {
            "round_id": self.round_id, "vector_length": self.vector_length, "modulus_bits": self.modulus_bits,
            "min_survivors": self.min_survivors, "tolerated_dropout": self.tolerated_dropout,
            "requested_degree": self.requested_degree, "stage": self.stage,
            "keys": {d: [b64encode(m), b64encode(s)] for d, (m, s) in self.keys.items()},
            "graph_seed": None if self.graph_seed is None else b64encode(self.graph_seed),
            "degree": self.degree, "threshold": self.threshold, "indices": dict(self.indices),
            "neighbours": {d: list(v) for d, v in self.neighbours.items()}, "shared": list(self.shared),
            "uploads": {d: {r: b64encode(b) for r, b in boxes.items()} for d, boxes in self.uploads.items()},
            "u2": list(self.u2), "folded": dict(self.folded), "u3": list(self.u3),
            "responses": {d: r.to_json() for d, r in self.responses.items()},
            "abandoned_reason": self.abandoned_reason, "abandoned_message": self.abandoned_message,
        }

    @classmethod
    def from_json(cls, body: Any) -> "CohortState":
        """The state `to_json` wrote.

        Raises:
            ValueError: not such a state (a missing or mistyped field, bad base64).
        """
        try:
            w = "SecAgg cohort state"
            key = lambda s: b64decode(s, "key", w, size=key_agreement.KEY_BYTES)  # noqa: E731
            state = cls(
                round_id=body["round_id"], vector_length=body["vector_length"], modulus_bits=body["modulus_bits"],
                min_survivors=body["min_survivors"], tolerated_dropout=float(body["tolerated_dropout"]),
                requested_degree=body["requested_degree"], stage=body["stage"],
                keys={d: (key(m), key(s)) for d, (m, s) in body["keys"].items()},
                graph_seed=None if body["graph_seed"] is None else b64decode(body["graph_seed"], "graph_seed", w,
                                                                             size=prg.SEED_BYTES),
                degree=body["degree"], threshold=body["threshold"], indices=dict(body["indices"]),
                neighbours={d: list(v) for d, v in body["neighbours"].items()}, shared=list(body["shared"]),
                uploads={d: {r: b64decode(b, "box", w, max_size=4096) for r, b in boxes.items()}
                         for d, boxes in body["uploads"].items()},
                u2=list(body["u2"]), folded=dict(body["folded"]), u3=list(body["u3"]),
                responses={d: UnmaskResponse.from_json(r) for d, r in body["responses"].items()},
                abandoned_reason=body["abandoned_reason"], abandoned_message=body["abandoned_message"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"not a SecAgg cohort state: {err}") from None
        if state.stage not in STAGES:
            raise ValueError(f"not a SecAgg cohort state: stage {state.stage!r}")
        return state


class SecAggCohort:
    """One SecAgg+ round, server side.

    Args:
        round_id: the round (every message must name it).
        vector_length: L, the number of uint32 coordinates of every masked input.
        modulus_bits: r: inputs, masks and the sum are modulo 2^r (1..32).
        min_survivors: the least number of devices whose inputs make a sum (>= 2: the sum of one
            device is its input); the round is abandoned when U1, U2 or U3 is smaller.
        tolerated_dropout: the fraction of its neighbours a device may lose (graph.thresholds).
        degree: k (default graph.default_degree(n)); clamped to n − 1.
        seen_keys: sha256 digests (`key_hash`) of public keys advertised in earlier rounds; a device
            that advertises one is refused (`reused_key`). Add `key_hashes()` after the round.

    Raises:
        ValueError: a parameter outside its range.
    """

    def __init__(self, round_id: int, *, vector_length: int, modulus_bits: int, min_survivors: int,
                 tolerated_dropout: float = 0.2, degree: int | None = None, seen_keys: set[bytes] | None = None):
        key_agreement.check_round_id(round_id)
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
            raise ValueError(f"vector_length must be an integer >= 1, got {vector_length!r}")
        prg.check_bits(modulus_bits)
        if isinstance(min_survivors, bool) or not isinstance(min_survivors, int) \
                or not 2 <= min_survivors <= MAX_COHORT:
            raise ValueError(f"min_survivors must be an integer in 2..{MAX_COHORT} (the sum of one device is "
                             f"its input), got {min_survivors!r}")
        if isinstance(tolerated_dropout, bool) or not isinstance(tolerated_dropout, (int, float)) \
                or not 0 <= tolerated_dropout < 0.5:
            raise ValueError(f"tolerated_dropout must be a fraction in [0, 0.5), got {tolerated_dropout!r}")
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        state = CohortState(round_id=round_id, vector_length=vector_length, modulus_bits=modulus_bits,
                            min_survivors=min_survivors, tolerated_dropout=float(tolerated_dropout),
                            requested_degree=degree)
        self._init(state, np.zeros(vector_length, dtype=np.uint32), seen_keys)

    def _init(self, state: CohortState, running_sum: np.ndarray, seen_keys: set[bytes] | None) -> None:
        self.state = state
        self._sum = running_sum
        self._seen = frozenset(seen_keys or ())

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The round's state, JSON-ready (the running sum is `running_sum`, beside it)."""
        return self.state.to_json()

    @property
    def running_sum(self) -> np.ndarray:
        """Σ of the masked inputs folded so far, mod 2^r (a copy)."""
        return self._sum.copy()

    @classmethod
    def from_json(cls, body: Any, running_sum: np.ndarray, *, seen_keys: set[bytes] | None = None) -> "SecAggCohort":
        """The cohort `to_json` and `running_sum` described, ready to continue.

        Raises:
            ValueError: not a state, or a sum of the wrong shape or dtype.
        """
        state = CohortState.from_json(body)
        running_sum = np.asarray(running_sum)
        if running_sum.dtype != np.uint32 or running_sum.shape != (state.vector_length,):
            raise ValueError(f"the running sum must be uint32 of shape ({state.vector_length},), got "
                             f"{running_sum.dtype} {running_sum.shape}")
        cohort = cls.__new__(cls)
        cohort._init(state, np.array(running_sum, dtype=np.uint32, copy=True), seen_keys)
        return cohort

    # -- status --------------------------------------------------------------------------------

    @property
    def stage(self) -> str:
        return self.state.stage

    @property
    def round_id(self) -> int:
        return self.state.round_id

    def counts(self) -> dict[str, int]:
        """Devices per stage: keys advertised (|U1|), shares uploaded, masked inputs uploaded (U3 so
        far), unmask answers; and |U2| once sharing closed."""
        s = self.state
        return {"advertised": len(s.keys), "shared": len(s.shared), "u2": len(s.u2), "uploaded": len(s.folded),
                "unmasked": len(s.responses)}

    def key_hashes(self) -> set[bytes]:
        """sha256 digests of every public key advertised in this round (for later rounds' seen_keys)."""
        return {key_hash(k) for pair in self.state.keys.values() for k in pair}

    # -- helpers -------------------------------------------------------------------------------

    def _check_open(self, stage: str) -> None:
        s = self.state
        if s.stage == ABANDONED:
            raise CohortAbandoned(s.abandoned_reason, s.abandoned_message)
        if s.stage != stage:
            raise SecAggRejected(WRONG_STAGE, f"round {s.round_id} is at stage {s.stage!r}, not {stage!r}")

    def _check_round(self, round_id: int) -> None:
        if round_id != self.state.round_id:
            raise SecAggRejected(ROUND_MISMATCH, f"the message is for round {round_id}, not {self.state.round_id}")

    def _abandon(self, reason: str, message: str) -> CohortAbandoned:
        self.state.stage = ABANDONED
        self.state.abandoned_reason, self.state.abandoned_message = reason, message
        return CohortAbandoned(reason, message)

    def _neighbours_in(self, device_id: str, members) -> list[str]:
        return [v for v in self.state.neighbours[device_id] if v in members]

    # -- stage 0 -------------------------------------------------------------------------------

    def advertise(self, device_id: str, advertisement: KeyAdvertisement) -> None:
        """Admit a device's two public keys to U1 (an identical retry is accepted again).

        Raises:
            SecAggRejected: wrong_stage, bad_device_id, round_mismatch, conflicting_advertisement,
                cohort_full, duplicate_key, bad_key, reused_key.
            CohortAbandoned: the round was abandoned.
        """
        self._check_open(ADVERTISING)
        if not valid_id(device_id):
            raise SecAggRejected(BAD_DEVICE_ID, "a device id is 1..128 printable ASCII characters")
        self._check_round(advertisement.round_id)
        pair = (advertisement.mask_key, advertisement.share_key)
        keys = self.state.keys
        if device_id in keys:
            if keys[device_id] != pair:
                raise SecAggRejected(CONFLICTING_ADVERTISEMENT, f"{device_id!r} already advertised other keys")
            return
        if len(keys) >= MAX_COHORT:
            raise SecAggRejected(COHORT_FULL, f"a cohort holds at most {MAX_COHORT} devices")
        if pair[0] == pair[1] or any(k in other for other in keys.values() for k in pair):
            raise SecAggRejected(DUPLICATE_KEY, f"{device_id!r} advertises a key already in this cohort")
        for key in pair:
            try:
                key_agreement.check_public_key(key)
            except key_agreement.BadPublicKey as err:
                raise SecAggRejected(BAD_KEY, f"{device_id!r}: {err}") from None
        if any(key_hash(key) in self._seen for key in pair):
            raise SecAggRejected(REUSED_KEY, f"{device_id!r} advertises a key of an earlier round")
        keys[device_id] = pair

    def close_advertising(self, seed: bytes) -> dict[str, NeighbourList]:
        """Fix U1, draw the graph and give every device its neighbour list.

        Indices: the ids of U1 sorted (as Python strings) get Shamir indices 1..n in that order,
        and node i − 1 of graph.neighbours(n, k, seed) is the device of index i.

        Raises:
            CohortAbandoned: too_few_devices (|U1| < min_survivors), impossible_thresholds.
            SecAggRejected: wrong_stage.
        """
        self._check_open(ADVERTISING)
        prg.check_seed(seed, what="graph seed")
        s = self.state
        n = len(s.keys)
        if n < s.min_survivors:
            raise self._abandon(TOO_FEW_DEVICES, f"{n} devices advertised keys, fewer than {s.min_survivors}")
        try:
            thresholds = graph.thresholds(n, degree=s.requested_degree, tolerated_dropout=s.tolerated_dropout)
        except ValueError as err:
            raise self._abandon(IMPOSSIBLE_THRESHOLDS, str(err)) from None
        ids = sorted(s.keys)
        table = graph.neighbours(n, thresholds.degree, seed)
        s.graph_seed, s.degree, s.threshold = seed, thresholds.degree, thresholds.threshold
        s.indices = {d: i + 1 for i, d in enumerate(ids)}
        s.neighbours = {ids[i]: sorted(ids[j] for j in row) for i, row in enumerate(table)}
        s.stage = SHARING
        return {d: self.neighbour_list(d) for d in ids}

    def neighbour_list(self, device_id: str) -> NeighbourList:
        """`device_id`'s stage-1 message (again, for a device that asks twice)."""
        s = self.state
        if device_id not in s.indices:
            raise SecAggRejected(NOT_IN_COHORT, f"{device_id!r} is not in round {s.round_id}'s cohort")
        entries = tuple(NeighbourEntry(device_id=v, index=s.indices[v], mask_key=s.keys[v][0], share_key=s.keys[v][1])
                        for v in s.neighbours[device_id])
        return NeighbourList(round_id=s.round_id, index=s.indices[device_id], cohort_size=len(s.indices),
                             degree=s.degree, threshold=s.threshold, modulus_bits=s.modulus_bits, neighbours=entries)

    # -- stage 1 -------------------------------------------------------------------------------

    def receive_shares(self, device_id: str, upload: ShareUpload) -> None:
        """Keep a device's boxes, one per neighbour (an identical retry is accepted again).

        Raises:
            SecAggRejected: wrong_stage, not_in_cohort, round_mismatch, wrong_recipients, bad_box,
                conflicting_upload.
        """
        self._check_open(SHARING)
        s = self.state
        if device_id not in s.indices:
            raise SecAggRejected(NOT_IN_COHORT, f"{device_id!r} is not in round {s.round_id}'s cohort")
        self._check_round(upload.round_id)
        if set(upload.boxes) != set(s.neighbours[device_id]):
            raise SecAggRejected(WRONG_RECIPIENTS, f"{device_id!r} must send one box to each of its "
                                                   f"{len(s.neighbours[device_id])} neighbours and no other device")
        for recipient, box in upload.boxes.items():
            if len(box) != _box_bytes(s.round_id, device_id, recipient):
                raise SecAggRejected(BAD_BOX, f"the box from {device_id!r} to {recipient!r} is {len(box)} bytes, not "
                                              f"{_box_bytes(s.round_id, device_id, recipient)}")
        if device_id in s.uploads:
            if s.uploads[device_id] != upload.boxes:
                raise SecAggRejected(CONFLICTING_UPLOAD, f"{device_id!r} already sent other boxes")
            return
        s.uploads[device_id] = dict(upload.boxes)
        s.shared.append(device_id)

    def close_sharing(self) -> dict[str, ShareInbox]:
        """Fix U2 (pruned to devices with >= t neighbours in U2) and give each its inbox.

        Raises:
            CohortAbandoned: too_few_shared (|U2| < min_survivors).
            SecAggRejected: wrong_stage.
        """
        self._check_open(SHARING)
        s = self.state
        u2 = set(s.uploads)
        while True:
            lacking = {u for u in u2 if len(self._neighbours_in(u, u2)) < s.threshold}
            if not lacking:
                break
            u2 -= lacking
        if len(u2) < s.min_survivors:
            raise self._abandon(TOO_FEW_SHARED, f"{len(s.uploads)} devices shared, {len(u2)} of them with at least "
                                                f"{s.threshold} neighbours that shared: fewer than {s.min_survivors}")
        s.u2 = sorted(u2)
        s.stage = INPUT
        return {u: self.inbox(u) for u in s.u2}

    def inbox(self, device_id: str) -> ShareInbox:
        """`device_id`'s stage-2 message: the boxes its neighbours in U2 sealed to it."""
        s = self.state
        if device_id not in s.u2 or s.stage != INPUT:
            raise SecAggRejected(NOT_IN_COHORT, f"{device_id!r} has no inbox in round {s.round_id} now")
        return ShareInbox(round_id=s.round_id,
                          boxes={v: s.uploads[v][device_id] for v in self._neighbours_in(device_id, set(s.u2))})

    # -- stage 2 -------------------------------------------------------------------------------

    def fold(self, device_id: str, masked: np.ndarray) -> bool:
        """Add a device's masked input to the running sum (mod 2^r); the input is not kept.

        Returns:
            True when folded, False for an identical retry (already in the sum).

        Raises:
            SecAggRejected: wrong_stage, not_in_cohort (not in U2), length_mismatch, bad_input (not
                uint32, not 1-D, a value >= 2^r), conflicting_input (a second, different input).
        """
        self._check_open(INPUT)
        s = self.state
        if device_id not in s.u2:
            raise SecAggRejected(NOT_IN_COHORT, f"{device_id!r} is not in U2 of round {s.round_id}")
        if not isinstance(masked, np.ndarray) or masked.dtype != np.uint32 or masked.ndim != 1:
            raise SecAggRejected(BAD_INPUT, "a masked input is a 1-D uint32 array")
        if masked.shape != (s.vector_length,):
            raise SecAggRejected(LENGTH_MISMATCH, f"a masked input has {s.vector_length} values, got {masked.size}")
        if s.modulus_bits < 32 and int(masked.max()) >> s.modulus_bits:
            raise SecAggRejected(BAD_INPUT, f"a masked value is >= 2^{s.modulus_bits}")
        digest = hashlib.sha256(np.ascontiguousarray(masked).tobytes()).hexdigest()
        if device_id in s.folded:
            if s.folded[device_id] != digest:
                raise SecAggRejected(CONFLICTING_INPUT, f"{device_id!r} already uploaded another masked input")
            return False
        add_mod(self._sum, masked, s.modulus_bits)
        s.folded[device_id] = digest
        return True

    def close_input(self) -> dict[str, UnmaskRequest]:
        """Fix U3 and ask each survivor for its shares.

        Survivor u's request: survivors = u itself and N(u) ∩ U3, dropped = N(u) ∩ (U2 \\ U3). The
        round is abandoned now, rather than after the answers, when some secret the result needs
        (b_v of a survivor, s_w of a dropped device with a surviving neighbour) has fewer than t
        holders among the survivors, so could never be rebuilt.

        Raises:
            CohortAbandoned: too_few_inputs (|U3| < min_survivors), too_few_shares.
            SecAggRejected: wrong_stage.
        """
        self._check_open(INPUT)
        s = self.state
        u3 = set(s.folded)
        if len(u3) < s.min_survivors:
            raise self._abandon(TOO_FEW_INPUTS, f"{len(u3)} masked inputs arrived, fewer than {s.min_survivors}")
        for device, holders in self._needed(u3).items():
            if len(holders) < s.threshold:
                raise self._abandon(TOO_FEW_SHARES, f"the secret of {device!r} has {len(holders)} holders among the "
                                                    f"survivors, fewer than the threshold {s.threshold}")
        s.u3 = sorted(u3)
        s.uploads = {}  # delivered; no longer needed
        s.stage = UNMASKING
        return {u: self.unmask_request(u) for u in s.u3}

    def _needed(self, u3: set[str]) -> dict[str, list[str]]:
        """The secrets the result needs, each with the survivors that hold shares of it: b_v of every
        v in U3 and s_w of every w in U2 \\ U3 with a neighbour in U3."""
        dropped = set(self.state.u2) - u3
        needed = {v: self._neighbours_in(v, u3) for v in sorted(u3)}
        needed.update({w: self._neighbours_in(w, u3) for w in sorted(dropped) if self._neighbours_in(w, u3)})
        return needed

    def unmask_request(self, device_id: str) -> UnmaskRequest:
        """Survivor `device_id`'s stage-3 message."""
        s = self.state
        if device_id not in s.u3:
            raise SecAggRejected(NOT_IN_COHORT, f"{device_id!r} is not in U3 of round {s.round_id}")
        u2, u3 = set(s.u2), set(s.u3)
        return UnmaskRequest(round_id=s.round_id,
                             survivors=tuple(sorted([device_id] + self._neighbours_in(device_id, u3))),
                             dropped=tuple(v for v in self._neighbours_in(device_id, u2) if v not in u3))

    # -- stage 3 -------------------------------------------------------------------------------

    def receive_unmask(self, device_id: str, response: UnmaskResponse) -> None:
        """Keep a survivor's shares (an identical retry is accepted again).

        Raises:
            SecAggRejected: wrong_stage, not_in_cohort (not in U3), round_mismatch, wrong_shares (not
                exactly a b-share per surviving neighbour and an s-share per dropped one), bad_share
                (not a field element), conflicting_response.
        """
        self._check_open(UNMASKING)
        s = self.state
        if device_id not in s.u3:
            raise SecAggRejected(NOT_IN_COHORT, f"{device_id!r} is not in U3 of round {s.round_id}")
        self._check_round(response.round_id)
        request = self.unmask_request(device_id)
        if set(response.self_seed_shares) != set(request.survivors) - {device_id} \
                or set(response.mask_key_shares) != set(request.dropped):
            raise SecAggRejected(WRONG_SHARES, f"{device_id!r} must answer a self-mask share for each surviving "
                                               "neighbour and a mask-key share for each dropped one, nothing else")
        for share in (*response.self_seed_shares.values(), *response.mask_key_shares.values()):
            if int.from_bytes(share, "big") >= shamir.PRIME:
                raise SecAggRejected(BAD_SHARE, f"a share from {device_id!r} is not a field element")
        if device_id in s.responses:
            if s.responses[device_id] != response:
                raise SecAggRejected(CONFLICTING_RESPONSE, f"{device_id!r} already answered with other shares")
            return
        s.responses[device_id] = response

    def _shares(self) -> dict[str, dict[int, bytes]]:
        """For each secret the result needs: {holder's index: share} from the answers so far."""
        s = self.state
        u3 = set(s.u3)
        out = {}
        for device, holders in self._needed(u3).items():
            kind = "self_seed_shares" if device in u3 else "mask_key_shares"
            out[device] = {s.indices[h]: getattr(s.responses[h], kind)[device] for h in holders if h in s.responses}
        return out

    def ready(self) -> bool:
        """Whether every secret the result needs has at least t shares (more make `result` check them)."""
        if self.state.stage not in (UNMASKING, DONE):
            return False
        return all(len(shares) >= self.state.threshold for shares in self._shares().values())

    def result(self) -> np.ndarray:
        """Σ_{U3} x_u mod 2^r (uint32): the running sum less every survivor's self mask and the
        pairwise masks between dropped devices and their surviving neighbours.

        Shares beyond t are checked (shamir.combine); a reconstructed mask key must be the one its
        device advertised. With exactly t shares a forged share goes undetected (there is no
        commitment to b_v): waiting for every survivor's answer makes forgery detectable.

        Raises:
            CohortAbandoned: too_few_shares (a secret with fewer than t shares so far),
                inconsistent_shares.
            SecAggRejected: wrong_stage.
        """
        s = self.state
        if s.stage != DONE:  # once done, recomputed from the same state: the same answer
            self._check_open(UNMASKING)
        u3 = set(s.u3)
        secrets_ = {}
        for device, shares in self._shares().items():
            if len(shares) < s.threshold:
                raise self._abandon(TOO_FEW_SHARES, f"the secret of {device!r} has {len(shares)} shares, fewer than "
                                                    f"the threshold {s.threshold}")
            try:
                secrets_[device] = shamir.combine(shares, s.threshold)
            except shamir.ShareError as err:
                raise self._abandon(INCONSISTENT_SHARES, f"the shares of {device!r}'s secret: {err}") from None
        total = self._sum.copy()
        bits = s.modulus_bits
        for v in sorted(u3):
            prg.apply_mask(total, secrets_[v], bits, subtract=True)
        for w in sorted(set(secrets_) - u3):
            try:
                if key_agreement.KeyPair.from_private(secrets_[w]).public != s.keys[w][0]:
                    raise ValueError("not the advertised key")
            except ValueError:
                raise self._abandon(INCONSISTENT_SHARES, f"the shares of {w!r}'s mask key rebuild a key that is not "
                                                         "the one it advertised") from None
            for v in self._neighbours_in(w, u3):
                low, high = sorted((v, w))
                seed = key_agreement.derive_key(key_agreement.shared_secret(secrets_[w], s.keys[v][0]),
                                                purpose="mask", round_id=s.round_id, a=low, b=high)
                # v added PRG(s_vw) if w > v, subtracted it if w < v: undo that.
                prg.apply_mask(total, seed, bits, subtract=w > v)
        s.stage = DONE
        return total

