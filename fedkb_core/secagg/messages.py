"""The SecAgg stage messages (docs/secure_aggregation.md, "Protocol logic"), as typed dataclasses.

Each message is a frozen dataclass that checks its own shape when built (`__post_init__`), so a
message made in-process is held to the same rules as one parsed from JSON; `from_json` parses
strictly (fedkb_core.protocol's `_require`: exact JSON types, int64 range) and raises
`ProtocolError` on anything malformed; `to_json` gives the JSON-ready dict. Bytes travel as
standard base64 with padding; decoding is strict (`validate=True`, canonical: the string must be
what encoding the bytes gives back) and every byte string has a fixed length (keys 32, shares 33)
or a small bound (boxes).

Bounds, so a hostile peer cannot make a parser allocate without limit (a body's size is bounded
by the HTTP layer; these bound what a parsed body may hold): at most `MAX_ENTRIES` (10,000)
entries in any list or map, ids of 1..`MAX_ID_CHARS` (128) printable ASCII characters (0x21–0x7e:
no space, no control character, no non-ASCII, so "sorted as Python strings" is byte order in every
language), boxes of at most `MAX_BOX_BYTES`, indices and cohort sizes of at most
`MAX_COHORT` = `MAX_ENTRIES` + 1.

Messages (server → device unless said otherwise):

    KeyAdvertisement   device → server, stage 0: the round's two X25519 public keys
    NeighbourList      stage 1: the device's Shamir index, n, k, t, r and its k neighbours
    ShareUpload        device → server, stage 1: one sealed box per neighbour
    ShareInbox         stage 2: the boxes sealed to this device by its neighbours in U2
    UnmaskRequest      stage 3: the device's neighbours in U2 split into survivors and dropped
    UnmaskResponse     device → server, stage 3: b-shares of survivors, s-shares of the dropped
    SecAggStatus       every stage: the round's stage and this device's next action, with the
                       NeighbourList, ShareInbox or UnmaskRequest that action needs

Conventions: a device never appears in its own `NeighbourList.neighbours`; an `UnmaskRequest`'s
`survivors` lists the device itself (it uploaded, or it would not be asked) as well as its
surviving neighbours, and its `dropped` never lists the device; an `UnmaskResponse` never carries
a share for the device itself (it holds none of its own).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from typing import Any

from fedkb_core.protocol import ProtocolError, _require
from fedkb_core.secagg.key_agreement import KEY_BYTES, MAX_ROUND_ID
from fedkb_core.secagg.shamir import SHARE_BYTES

MAX_ENTRIES = 10_000
MAX_ID_CHARS = 128
MAX_COHORT = MAX_ENTRIES + 1  # a device and at most MAX_ENTRIES neighbours
MAX_MODULUS_BITS = 32
# A box is 12 (nonce) + 16 (tag) + 8 (round) + 2 + 2 (id lengths) + 66 (two shares) + both ids
# (share_box's layout): at most 362 bytes for two 128-character ids.
MAX_BOX_BYTES = 512


def valid_id(value: object) -> bool:
    """Whether `value` is a device id as these messages carry them."""
    return (isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS
            and all("!" <= c <= "~" for c in value))


def check_id(value: object, where: str) -> str:
    if not valid_id(value):
        shown = value[:MAX_ID_CHARS] if isinstance(value, str) else type(value).__name__
        raise ProtocolError(f"{where}: a device id is 1..{MAX_ID_CHARS} printable ASCII characters, "
                            f"got {shown!r}")
    return value


def _check_int(value: object, name: str, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{where}: {name} must be an integer in {low}..{high}, got {value!r}")
    return value


def _check_round(value: object, where: str) -> int:
    return _check_int(value, "round_id", 0, MAX_ROUND_ID, where)


def _check_bytes(value: object, name: str, where: str, *, size: int | None = None,
                 max_size: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"{where}: {name} must be bytes")
    if size is not None and len(value) != size:
        raise ProtocolError(f"{where}: {name} must be {size} bytes, got {len(value)}")
    if max_size is not None and not 1 <= len(value) <= max_size:
        raise ProtocolError(f"{where}: {name} must be 1..{max_size} bytes, got {len(value)}")
    return value


def _check_count(count: int, name: str, where: str) -> None:
    if count > MAX_ENTRIES:
        raise ProtocolError(f"{where}: {name} holds at most {MAX_ENTRIES} entries, got {count}")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(value: object, name: str, where: str, *, size: int | None = None,
              max_size: int | None = None) -> bytes:
    """Strict standard base64 (padded, canonical) of at most the bytes a field may hold."""
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: {name} must be a base64 string")
    limit = size if size is not None else max_size
    if len(value) > 4 * ((limit + 2) // 3):
        raise ProtocolError(f"{where}: {name} is longer than {limit} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{where}: {name} is not standard base64") from None
    if b64encode(data) != value:
        raise ProtocolError(f"{where}: {name} is not canonical base64")
    return _check_bytes(data, name, where, size=size, max_size=max_size)


def _require_b64(body: Any, name: str, where: str, **size) -> bytes:
    return b64decode(_require(body, name, str, where=where), name, where, **size)


def _require_map(body: Any, name: str, where: str) -> dict:
    raw = _require(body, name, dict, where=where)
    _check_count(len(raw), name, where)
    return raw


def _require_ids(body: Any, name: str, where: str) -> tuple[str, ...]:
    raw = _require(body, name, list, where=where)
    _check_count(len(raw), name, where)
    return tuple(check_id(value, f"{where}: {name}") for value in raw)


def _bytes_map(raw: Mapping, name: str, where: str, **size) -> dict[str, bytes]:
    """{id: bytes} checked: a map of at most MAX_ENTRIES valid ids to byte strings of `size`."""
    if not isinstance(raw, Mapping):
        raise ProtocolError(f"{where}: {name} must be a map of device ids")
    _check_count(len(raw), name, where)
    out = {}
    for key, value in raw.items():
        out[check_id(key, f"{where}: {name}")] = _check_bytes(value, f"{name}[{key!r}]", where, **size)
    return out


def _parse_bytes_map(body: Any, name: str, where: str, **size) -> dict[str, bytes]:
    raw = _require_map(body, name, where)
    return {check_id(key, f"{where}: {name}"): b64decode(value, f"{name}[{key!r}]", where, **size)
            for key, value in raw.items()}


def _freeze(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


@dataclasses.dataclass(frozen=True)
class KeyAdvertisement:
    """Stage 0, device → server: the device's two fresh X25519 public keys for this round."""

    round_id: int
    mask_key: bytes  # s_u's public key: pairwise mask seeds
    share_key: bytes  # c_u's public key: the keys of the boxes carrying shares

    WHERE = "key advertisement"

    def __post_init__(self):
        _check_round(self.round_id, self.WHERE)
        _check_bytes(self.mask_key, "mask_key", self.WHERE, size=KEY_BYTES)
        _check_bytes(self.share_key, "share_key", self.WHERE, size=KEY_BYTES)

    def to_json(self) -> dict:
        return {"round_id": self.round_id, "mask_key": b64encode(self.mask_key),
                "share_key": b64encode(self.share_key)}

    @classmethod
    def from_json(cls, body: Any) -> "KeyAdvertisement":
        w = cls.WHERE
        return cls(round_id=_require(body, "round_id", int, where=w),
                   mask_key=_require_b64(body, "mask_key", w, size=KEY_BYTES),
                   share_key=_require_b64(body, "share_key", w, size=KEY_BYTES))


@dataclasses.dataclass(frozen=True)
class NeighbourEntry:
    """One neighbour in a `NeighbourList`: its id, Shamir index (x-coordinate) and both keys."""

    device_id: str
    index: int
    mask_key: bytes
    share_key: bytes

    WHERE = "neighbour"

    def __post_init__(self):
        check_id(self.device_id, self.WHERE)
        _check_int(self.index, "index", 1, MAX_COHORT, self.WHERE)
        _check_bytes(self.mask_key, "mask_key", self.WHERE, size=KEY_BYTES)
        _check_bytes(self.share_key, "share_key", self.WHERE, size=KEY_BYTES)

    def to_json(self) -> dict:
        return {"device_id": self.device_id, "index": self.index, "mask_key": b64encode(self.mask_key),
                "share_key": b64encode(self.share_key)}

    @classmethod
    def from_json(cls, body: Any) -> "NeighbourEntry":
        w = cls.WHERE
        return cls(device_id=_require(body, "device_id", str, where=w),
                   index=_require(body, "index", int, where=w),
                   mask_key=_require_b64(body, "mask_key", w, size=KEY_BYTES),
                   share_key=_require_b64(body, "share_key", w, size=KEY_BYTES))


@dataclasses.dataclass(frozen=True)
class NeighbourList:
    """Stage 1, server → device: the round's parameters and the device's neighbours N(u).

    `index` is this device's own Shamir x-coordinate (1..cohort_size); the server assigns
    indices 1..n to the cohort's ids in sorted order. The device never appears among
    `neighbours`. Only the shape is checked here; whether the list is acceptable (no self, no
    duplicate, k/2 < t <= k = len(neighbours), ...) is the participant's decision, with a
    refusal code (edge_runtime/secagg_participant.py).
    """

    round_id: int
    index: int
    cohort_size: int
    degree: int
    threshold: int
    modulus_bits: int
    neighbours: tuple[NeighbourEntry, ...]

    WHERE = "neighbour list"

    def __post_init__(self):
        w = self.WHERE
        _check_round(self.round_id, w)
        _check_int(self.index, "index", 1, MAX_COHORT, w)
        _check_int(self.cohort_size, "cohort_size", 1, MAX_COHORT, w)
        _check_int(self.degree, "degree", 0, MAX_ENTRIES, w)
        _check_int(self.threshold, "threshold", 0, MAX_ENTRIES, w)
        _check_int(self.modulus_bits, "modulus_bits", 0, 64, w)
        if not isinstance(self.neighbours, (tuple, list)):
            raise ProtocolError(f"{w}: neighbours must be a sequence")
        _check_count(len(self.neighbours), "neighbours", w)
        if not all(isinstance(entry, NeighbourEntry) for entry in self.neighbours):
            raise ProtocolError(f"{w}: neighbours must be NeighbourEntry values")
        _freeze(self, "neighbours", tuple(self.neighbours))

    def to_json(self) -> dict:
        return {"round_id": self.round_id, "index": self.index, "cohort_size": self.cohort_size,
                "degree": self.degree, "threshold": self.threshold, "modulus_bits": self.modulus_bits,
                "neighbours": [entry.to_json() for entry in self.neighbours]}

    @classmethod
    def from_json(cls, body: Any) -> "NeighbourList":
        w = cls.WHERE
        raw = _require(body, "neighbours", list, where=w)
        _check_count(len(raw), "neighbours", w)
        return cls(round_id=_require(body, "round_id", int, where=w),
                   index=_require(body, "index", int, where=w),
                   cohort_size=_require(body, "cohort_size", int, where=w),
                   degree=_require(body, "degree", int, where=w),
                   threshold=_require(body, "threshold", int, where=w),
                   modulus_bits=_require(body, "modulus_bits", int, where=w),
                   neighbours=tuple(NeighbourEntry.from_json(entry) for entry in raw))


@dataclasses.dataclass(frozen=True)
class _BoxMap:
    """A round id and {device id: a sealed share box}: the shape of both box messages."""

    round_id: int
    boxes: dict[str, bytes]

    WHERE = "share boxes"

    def __post_init__(self):
        _check_round(self.round_id, self.WHERE)
        _freeze(self, "boxes", _bytes_map(self.boxes, "boxes", self.WHERE, max_size=MAX_BOX_BYTES))

    def to_json(self) -> dict:
        return {"round_id": self.round_id, "boxes": {k: b64encode(v) for k, v in self.boxes.items()}}

    @classmethod
    def from_json(cls, body: Any):
        w = cls.WHERE
        return cls(round_id=_require(body, "round_id", int, where=w),
                   boxes=_parse_bytes_map(body, "boxes", w, max_size=MAX_BOX_BYTES))


@dataclasses.dataclass(frozen=True)
class ShareUpload(_BoxMap):
    """Stage 1, device → server: {recipient id: the box sealed to that neighbour}."""

    WHERE = "share upload"


@dataclasses.dataclass(frozen=True)
class ShareInbox(_BoxMap):
    """Stage 2, server → device: {sender id: the box that sender sealed to this device}.

    The senders are exactly this device's neighbours in U2 (those whose shares the server
    holds and keeps in the round): N(u) ∩ U2. The device masks with exactly these neighbours.
    """

    WHERE = "share inbox"


def _unique_ids(values, name: str, where: str) -> tuple[str, ...]:
    if not isinstance(values, (tuple, list)):
        raise ProtocolError(f"{where}: {name} must be a sequence of device ids")
    _check_count(len(values), name, where)
    ids = tuple(check_id(value, f"{where}: {name}") for value in values)
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"{where}: {name} names a device twice")
    return ids


@dataclasses.dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, server → device: the fate of the device's neighbours in U2.

    `survivors`: the device itself (always: the convention that says "you are in U3") and its
    neighbours whose masked input arrived (N(u) ∩ U3); `dropped`: its neighbours in U2 whose input
    did not (N(u) ∩ (U2 \\ U3)). Together (less the device itself) they are exactly N(u) ∩ U2. Each
    list names a device at most once; compared as sets.
    """

    round_id: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    WHERE = "unmask request"

    def __post_init__(self):
        _check_round(self.round_id, self.WHERE)
        _freeze(self, "survivors", _unique_ids(self.survivors, "survivors", self.WHERE))
        _freeze(self, "dropped", _unique_ids(self.dropped, "dropped", self.WHERE))

    def to_json(self) -> dict:
        return {"round_id": self.round_id, "survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_json(cls, body: Any) -> "UnmaskRequest":
        w = cls.WHERE
        return cls(round_id=_require(body, "round_id", int, where=w),
                   survivors=_require_ids(body, "survivors", w),
                   dropped=_require_ids(body, "dropped", w))


@dataclasses.dataclass(frozen=True)
class UnmaskResponse:
    """Stage 3, device → server: the 33-byte Shamir shares the device holds, one kind per neighbour:
    {survivor id: its share of that survivor's self-mask seed b_v} and {dropped id: its share of
    that device's mask private key s_v}. Never both kinds for one id (refused here too)."""

    round_id: int
    self_seed_shares: dict[str, bytes]
    mask_key_shares: dict[str, bytes]

    WHERE = "unmask response"

    def __post_init__(self):
        w = self.WHERE
        _check_round(self.round_id, w)
        _freeze(self, "self_seed_shares", _bytes_map(self.self_seed_shares, "self_seed_shares", w, size=SHARE_BYTES))
        _freeze(self, "mask_key_shares", _bytes_map(self.mask_key_shares, "mask_key_shares", w, size=SHARE_BYTES))
        both = self.self_seed_shares.keys() & self.mask_key_shares.keys()
        if both:
            raise ProtocolError(f"{w}: both kinds of share for {sorted(both)[0]!r}")

    def to_json(self) -> dict:
        return {"round_id": self.round_id,
                "self_seed_shares": {k: b64encode(v) for k, v in self.self_seed_shares.items()},
                "mask_key_shares": {k: b64encode(v) for k, v in self.mask_key_shares.items()}}

    @classmethod
    def from_json(cls, body: Any) -> "UnmaskResponse":
        w = cls.WHERE
        return cls(round_id=_require(body, "round_id", int, where=w),
                   self_seed_shares=_parse_bytes_map(body, "self_seed_shares", w, size=SHARE_BYTES),
                   mask_key_shares=_parse_bytes_map(body, "mask_key_shares", w, size=SHARE_BYTES))


STAGES = ("advertising", "sharing", "input", "unmasking", "finished", "abandoned")
ACTIONS = ("wait", "share", "upload", "unmask", "done", "dropped")
_ACTION_PAYLOAD = {"share": "neighbours", "upload": "inbox", "unmask": "unmask"}


@dataclasses.dataclass(frozen=True)
class SecAggStatus:
    """The server's answer to every SecAgg request: the round's stage and this device's next step.

    `action` is one of ACTIONS; `share` comes with `neighbours`, `upload` with `inbox`, `unmask`
    with `unmask` (and no other action carries any of the three); `wait` with a `retry_after` in
    seconds; `dropped` with a `reason` (why this device is out of the round).
    """

    round_id: int
    stage: str
    action: str
    retry_after: float | None = None
    neighbours: NeighbourList | None = None
    inbox: ShareInbox | None = None
    unmask: UnmaskRequest | None = None
    reason: str | None = None

    WHERE = "secagg status"

    def __post_init__(self):
        w = self.WHERE
        _check_round(self.round_id, w)
        if self.stage not in STAGES:
            raise ProtocolError(f"{w}: stage must be one of {', '.join(STAGES)}, got {self.stage!r:.40}")
        if self.action not in ACTIONS:
            raise ProtocolError(f"{w}: action must be one of {', '.join(ACTIONS)}, got {self.action!r:.40}")
        for action, field in _ACTION_PAYLOAD.items():
            present = getattr(self, field) is not None
            if present != (self.action == action):
                raise ProtocolError(f"{w}: {field!r} comes with action {action!r} and only with it")
        field = _ACTION_PAYLOAD.get(self.action)
        if field is not None and getattr(self, field).round_id != self.round_id:
            raise ProtocolError(f"{w}: the {field} are for round {getattr(self, field).round_id}, "
                                f"the status for round {self.round_id}")
        if self.action == "wait" and (self.retry_after is None or not 0 <= self.retry_after <= 86_400):
            raise ProtocolError(f"{w}: action 'wait' needs a retry_after in 0..86400 seconds")
        if self.reason is not None and (not isinstance(self.reason, str) or len(self.reason) > 200):
            raise ProtocolError(f"{w}: reason must be a string of at most 200 characters")

    def to_json(self) -> dict:
        out = {"round_id": self.round_id, "stage": self.stage, "action": self.action}
        for name in ("retry_after", "reason"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("neighbours", "inbox", "unmask"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).to_json()
        return out

    @classmethod
    def from_json(cls, body: Any) -> "SecAggStatus":
        w = cls.WHERE

        def part(name, kind):
            raw = _require(body, name, dict, where=w, optional=True)
            return None if raw is None else kind.from_json(raw)

        return cls(round_id=_require(body, "round_id", int, where=w),
                   stage=_require(body, "stage", str, where=w),
                   action=_require(body, "action", str, where=w),
                   retry_after=_require(body, "retry_after", float, where=w, optional=True),
                   neighbours=part("neighbours", NeighbourList), inbox=part("inbox", ShareInbox),
                   unmask=part("unmask", UnmaskRequest),
                   reason=_require(body, "reason", str, where=w, optional=True))
