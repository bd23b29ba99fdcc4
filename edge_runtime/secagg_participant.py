"""The device's side of a SecAgg+ round (docs/secure_aggregation.md, "Protocol logic"), transport-free.

One `SecAggParticipant` per device, over a state folder. Each stage is one method that takes the
server's message and returns the device's answer:

    advertise(round_id) -> KeyAdvertisement     stage 0: two fresh X25519 key pairs
    share(NeighbourList) -> ShareUpload         stage 1: b_u and s_u's private key, t-of-k, sealed
    receive(ShareInbox)                         stage 2: open and keep the neighbours' shares
    mask(x) -> y                                stage 2: y = x + masks (mod 2^r)
    unmask(UnmaskRequest) -> UnmaskResponse     stage 3: one kind of share per neighbour

Everything a later stage needs (private keys, b_u, the neighbour list, the shares received, the
answers already given) is in one JSON file per round, `round-<id>.json` (0600: it holds private
keys), written with `fedkb_core.durable.atomic_write_json` before the method returns. Objects
keep nothing in memory: a new object over the same folder (a restarted process) continues the
round where the file says it is. Every method is idempotent: the same message again gets the same
answer from the file; a different message at a stage already answered is refused
(`conflicting_request`), so a server cannot learn two different answers of one stage (two
different masked inputs, or both kinds of share for one neighbour across two requests).

The device works on one round at a time: the round it advertised last is its current round
(`current.json`), every message must name it (`round_mismatch` otherwise), and `mask` masks for
it. Older rounds' files stay until `forget`.

`seen-keys.json` keeps the sha256s of the public keys (the neighbours' and the device's own) of
the last `KEY_HISTORY_ROUNDS` rounds this device shared in, so a neighbour key replayed from an
earlier round is refused (`reused_key`): a fresh key per round is what makes every pairwise mask
and box key of a round unrelated to any earlier one.

Refusals raise `SecAggRefused` with a stable `code` (table in docs/secure_aggregation.md) and
change nothing on disk. Imports fedkb_core only (no TensorFlow, no aggregator).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from fedkb_core.durable import atomic_write_json, remove_temps
from fedkb_core.protocol import ProtocolError
from fedkb_core.secagg import key_agreement, prg, shamir, share_box
from fedkb_core.secagg.messages import (KeyAdvertisement, NeighbourList, ShareInbox, ShareUpload, UnmaskRequest,
                                        UnmaskResponse, b64decode, b64encode, valid_id)

STATE_VERSION = 1
KEY_HISTORY_ROUNDS = 64
SEED_BYTES = prg.SEED_BYTES

# Refusal codes (stable; docs/secure_aggregation.md lists what each means).
STAGE_ORDER = "stage_order"
ROUND_MISMATCH = "round_mismatch"
CONFLICTING_REQUEST = "conflicting_request"
SELF_IN_NEIGHBOURS = "self_in_neighbours"
DUPLICATE_NEIGHBOUR = "duplicate_neighbour"
BAD_INDEX = "bad_index"
DUPLICATE_KEY = "duplicate_key"
BAD_KEY = "bad_key"
REUSED_KEY = "reused_key"
BAD_THRESHOLD = "bad_threshold"
BAD_SHARE_BOX = "bad_share_box"
TOO_FEW_NEIGHBOURS = "too_few_neighbours"
BOTH_SHARES_REQUESTED = "both_shares_requested"
NOT_A_NEIGHBOUR = "not_a_neighbour"
INCOMPLETE_REQUEST = "incomplete_request"
SELF_NOT_SURVIVOR = "self_not_survivor"
TOO_FEW_SURVIVORS = "too_few_survivors"
STATE_UNREADABLE = "state_unreadable"
REFUSAL_CODES = (STAGE_ORDER, ROUND_MISMATCH, CONFLICTING_REQUEST, SELF_IN_NEIGHBOURS, DUPLICATE_NEIGHBOUR, BAD_INDEX,
                 DUPLICATE_KEY, BAD_KEY, REUSED_KEY, BAD_THRESHOLD, BAD_SHARE_BOX, TOO_FEW_NEIGHBOURS,
                 BOTH_SHARES_REQUESTED, NOT_A_NEIGHBOUR, INCOMPLETE_REQUEST, SELF_NOT_SURVIVOR, TOO_FEW_SURVIVORS,
                 STATE_UNREADABLE)

# Stages in order; a round's file records the last one completed.
ADVERTISED, SHARED, RECEIVED, MASKED, UNMASKED = "advertised", "shared", "received", "masked", "unmasked"
_STAGES = (ADVERTISED, SHARED, RECEIVED, MASKED, UNMASKED)

_CURRENT = "current.json"
_SEEN_KEYS = "seen-keys.json"
_ROUND_FILE = re.compile(r"round-(0|[1-9][0-9]{0,18})\.json")


class SecAggRefused(Exception):
    """The device refuses a server message; `code` is stable (for logs and the server), the message
    says why. Nothing was written."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _key_hash(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def _canonical_neighbours(neighbours: NeighbourList) -> dict:
    """The list as compared for idempotency: entries in id order (the server's order is not part of
    the question asked)."""
    body = neighbours.to_json()
    body["neighbours"] = sorted(body["neighbours"], key=lambda entry: (entry["device_id"], entry["index"]))
    return body


def _request_sets(request: UnmaskRequest) -> tuple[frozenset, frozenset]:
    return frozenset(request.survivors), frozenset(request.dropped)


class SecAggParticipant:
    """The device side of SecAgg rounds, durable in `state_dir`.

    Args:
        state_dir: this device's SecAgg folder (created 0700); one participant per folder at a
            time (no locking: the device runs one round at a time in one process).
        device_id: the id the server knows this device by (as in every message).

    Raises:
        ValueError: an id that messages cannot carry (1..128 printable ASCII characters).
    """

    def __init__(self, state_dir: Path, device_id: str):
        if not valid_id(device_id):
            raise ValueError(f"a device id is 1..128 printable ASCII characters, got {device_id!r}")
        self.state_dir = Path(state_dir)
        self.device_id = device_id
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_temps(self.state_dir)  # a write a crash interrupted (the old file is whole)

    # -- files -------------------------------------------------------------------------------

    def _round_path(self, round_id: int) -> Path:
        return self.state_dir / f"round-{round_id}.json"

    def rounds(self) -> list[int]:
        """Round ids this device holds state for, ascending."""
        found = (_ROUND_FILE.fullmatch(p.name) for p in self.state_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def current_round(self) -> int | None:
        """The round advertised last (the one messages must name and `mask` masks for), if held."""
        body = self._read_json(self.state_dir / _CURRENT)
        if body is None:
            return None
        round_id = body.get("round_id") if isinstance(body, dict) else None
        if isinstance(round_id, bool) or not isinstance(round_id, int):
            raise SecAggRefused(STATE_UNREADABLE, f"{self.state_dir / _CURRENT} does not name a round")
        return round_id if self._round_path(round_id).exists() else None

    def forget(self, round_id: int) -> None:
        """Delete a round's state (its private keys and shares); no-op if not held."""
        if self.current_round() == round_id:
            (self.state_dir / _CURRENT).unlink(missing_ok=True)
        self._round_path(round_id).unlink(missing_ok=True)

    def _read_json(self, path: Path) -> Any:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise SecAggRefused(STATE_UNREADABLE, f"{path} is not JSON") from None

    def _load(self, round_id: int) -> dict:
        path = self._round_path(round_id)
        state = self._read_json(path)
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION \
                or state.get("round_id") != round_id or state.get("device_id") != self.device_id \
                or state.get("stage") not in _STAGES:
            raise SecAggRefused(STATE_UNREADABLE, f"{path} is not this device's state of round {round_id}")
        return state

    def _save(self, state: dict) -> None:
        atomic_write_json(self._round_path(state["round_id"]), state, indent=None, permissions=0o600)

    def _current(self, stage: str, round_id: int | None = None) -> dict:
        """The current round's state, which must have completed `stage` (and be `round_id`, if given)."""
        current = self.current_round()
        if current is None:
            raise SecAggRefused(STAGE_ORDER, "no round is in progress: advertise keys first")
        if round_id is not None and round_id != current:
            raise SecAggRefused(ROUND_MISMATCH, f"the message is for round {round_id}, this device is in round "
                                                 f"{current}")
        state = self._load(current)
        if _STAGES.index(state["stage"]) < _STAGES.index(stage):
            raise SecAggRefused(STAGE_ORDER, f"round {current} is at stage {state['stage']!r}, before {stage!r}")
        return state

    @staticmethod
    def _advance(state: dict, stage: str) -> None:
        if _STAGES.index(stage) > _STAGES.index(state["stage"]):
            state["stage"] = stage

    def _bytes(self, state: dict, name: str, size: int) -> bytes:
        try:
            return b64decode(state[name], name, "SecAgg state", size=size)
        except (KeyError, ProtocolError) as err:
            raise SecAggRefused(STATE_UNREADABLE, f"round {state['round_id']}: {name}: {err}") from None

    # -- stage 0 -----------------------------------------------------------------------------

    def advertise(self, round_id: int) -> KeyAdvertisement:
        """This device's two public keys for `round_id`, drawn fresh the first time and kept.

        The round becomes the current one. Asked again for a held round, the same keys (a key
        pair is never used for two rounds; a forgotten round's keys are gone for good).
        """
        key_agreement.check_round_id(round_id)
        path = self._round_path(round_id)
        if path.exists():
            state = self._load(round_id)
        else:
            mask, share = key_agreement.KeyPair.generate(), key_agreement.KeyPair.generate()
            state = {"version": STATE_VERSION, "round_id": round_id, "device_id": self.device_id, "stage": ADVERTISED,
                     "mask_private": b64encode(mask.private), "mask_public": b64encode(mask.public),
                     "share_private": b64encode(share.private), "share_public": b64encode(share.public)}
            self._save(state)
        if self.current_round() != round_id:
            atomic_write_json(self.state_dir / _CURRENT, {"round_id": round_id}, indent=None, permissions=0o600)
        return KeyAdvertisement(round_id=round_id, mask_key=self._bytes(state, "mask_public", key_agreement.KEY_BYTES),
                                share_key=self._bytes(state, "share_public", key_agreement.KEY_BYTES))

    # -- stage 1 -----------------------------------------------------------------------------

    def share(self, neighbours: NeighbourList) -> ShareUpload:
        """Shamir-share b_u and the mask private key t-of-k among the neighbours, one box each.

        Raises:
            SecAggRefused: stage_order, round_mismatch, conflicting_request, self_in_neighbours,
                duplicate_neighbour, bad_index, duplicate_key, bad_key, reused_key, bad_threshold.
        """
        state = self._current(ADVERTISED, neighbours.round_id)
        if "neighbours" in state:
            if state["neighbours"] != _canonical_neighbours(neighbours):
                raise SecAggRefused(CONFLICTING_REQUEST, f"round {neighbours.round_id}: this device already shared "
                                                         "with another neighbour list")
            self._remember_keys(state)  # a crash may have come between the two writes
            return ShareUpload.from_json(state["upload"])
        own_keys = (self._bytes(state, "mask_public", 32), self._bytes(state, "share_public", 32))
        self._check_neighbours(neighbours, own_keys)

        round_id, me, t = neighbours.round_id, self.device_id, neighbours.threshold
        mask_private = self._bytes(state, "mask_private", 32)
        share_private = self._bytes(state, "share_private", 32)
        self_seed = secrets.token_bytes(SEED_BYTES)  # b_u
        xs = [entry.index for entry in neighbours.neighbours]
        seed_shares = shamir.split(self_seed, t, xs)
        key_shares = shamir.split(mask_private, t, xs)
        boxes = {}
        for entry in neighbours.neighbours:
            key = key_agreement.derive_key(key_agreement.shared_secret(share_private, entry.share_key),
                                           purpose="shares", round_id=round_id, a=me, b=entry.device_id)
            plaintext = share_box.pack_shares(me, entry.device_id, round_id, seed_shares[entry.index],
                                              key_shares[entry.index])
            boxes[entry.device_id] = share_box.seal(key, plaintext, round_id=round_id, sender=me,
                                                    recipient=entry.device_id)
        upload = ShareUpload(round_id=round_id, boxes=boxes)
        state.update(stage=SHARED, neighbours=_canonical_neighbours(neighbours), self_seed=b64encode(self_seed),
                     upload=upload.to_json())
        self._remember_keys(state)
        self._save(state)
        return upload

    def _check_neighbours(self, neighbours: NeighbourList, own_keys: tuple[bytes, bytes]) -> None:
        entries, me, r = neighbours.neighbours, self.device_id, neighbours.round_id
        ids = [entry.device_id for entry in entries]
        indices = [entry.index for entry in entries]
        if me in ids:
            raise SecAggRefused(SELF_IN_NEIGHBOURS, f"round {r}: this device ({me!r}) is listed as its own neighbour")
        if neighbours.index in indices:
            raise SecAggRefused(SELF_IN_NEIGHBOURS, f"round {r}: a neighbour has this device's index "
                                                     f"{neighbours.index}")
        if len(set(ids)) != len(ids):
            raise SecAggRefused(DUPLICATE_NEIGHBOUR, f"round {r}: a neighbour id is listed twice")
        if len(set(indices)) != len(indices):
            raise SecAggRefused(DUPLICATE_NEIGHBOUR, f"round {r}: two neighbours share an index")
        n = neighbours.cohort_size
        if not 1 <= neighbours.index <= n or any(not 1 <= x <= n for x in indices):
            raise SecAggRefused(BAD_INDEX, f"round {r}: an index is outside 1..{n} (the cohort size)")
        keys = [key for entry in entries for key in (entry.mask_key, entry.share_key)]
        if len(set(keys)) != len(keys):
            raise SecAggRefused(DUPLICATE_KEY, f"round {r}: two neighbour keys are equal")
        if set(keys) & set(own_keys):
            raise SecAggRefused(DUPLICATE_KEY, f"round {r}: a neighbour holds one of this device's own keys")
        for entry in entries:
            for key in (entry.mask_key, entry.share_key):
                try:
                    key_agreement.check_public_key(key)
                except key_agreement.BadPublicKey as err:
                    raise SecAggRefused(BAD_KEY, f"round {r}: neighbour {entry.device_id!r}: {err}") from None
        seen = self._seen_keys(exclude_owner=_key_hash(own_keys[0]))
        for entry in entries:
            if {_key_hash(entry.mask_key), _key_hash(entry.share_key)} & seen:
                raise SecAggRefused(REUSED_KEY, f"round {r}: neighbour {entry.device_id!r} sends a key this device "
                                                "saw in an earlier round")
        k, t = neighbours.degree, neighbours.threshold
        if not 1 <= neighbours.modulus_bits <= prg.MAX_BITS:
            raise SecAggRefused(BAD_THRESHOLD, f"round {r}: modulus_bits {neighbours.modulus_bits} is not in 1..32")
        if k != len(entries) or not k / 2 < t <= k:
            raise SecAggRefused(BAD_THRESHOLD, f"round {r}: degree {k}, threshold {t} and {len(entries)} neighbours "
                                               "do not satisfy degree = neighbours, degree/2 < threshold <= degree")
        if n < len(entries) + 1:
            raise SecAggRefused(BAD_THRESHOLD, f"round {r}: a cohort of {n} cannot hold this device and "
                                               f"{len(entries)} neighbours")

    # -- the key history ---------------------------------------------------------------------

    def _history(self) -> list[dict]:
        body = self._read_json(self.state_dir / _SEEN_KEYS)
        if body is None:
            return []
        rounds = body.get("rounds") if isinstance(body, dict) else None
        if not isinstance(rounds, list) or not all(
                isinstance(e, dict) and isinstance(e.get("owner"), str) and isinstance(e.get("keys"), list)
                for e in rounds):
            raise SecAggRefused(STATE_UNREADABLE, f"{self.state_dir / _SEEN_KEYS} is not a key history")
        return rounds

    def _seen_keys(self, *, exclude_owner: str) -> set[str]:
        """sha256s of every key of the remembered rounds but the one `exclude_owner` names (this
        round's own entry, present if a crash came after it was written)."""
        return {key for entry in self._history() if entry["owner"] != exclude_owner for key in entry["keys"]}

    def _remember_keys(self, state: dict) -> None:
        """Record the round's keys (own and neighbours') in the history; keep the last 64 rounds.
        An entry is named by the hash of the round's own mask key (unique per round state), and
        replaced if a crash left one from another neighbour list of this round."""
        own = [self._bytes(state, "mask_public", 32), self._bytes(state, "share_public", 32)]
        owner = _key_hash(own[0])
        neighbours = NeighbourList.from_json(state["neighbours"]).neighbours
        keys = sorted({_key_hash(key) for key in own}
                      | {_key_hash(key) for entry in neighbours for key in (entry.mask_key, entry.share_key)})
        entry = {"round_id": state["round_id"], "owner": owner, "keys": keys}
        history = self._history()
        if entry in history:
            return
        history = [e for e in history if e["owner"] != owner] + [entry]
        atomic_write_json(self.state_dir / _SEEN_KEYS, {"version": STATE_VERSION,
                                                        "rounds": history[-KEY_HISTORY_ROUNDS:]},
                          indent=None, permissions=0o600)

    # -- stage 2 -----------------------------------------------------------------------------

    def receive(self, inbox: ShareInbox) -> None:
        """Open and keep the shares the neighbours in U2 sealed to this device.

        The senders are N(u) ∩ U2: this device masks with exactly them.

        Raises:
            SecAggRefused: stage_order, round_mismatch, conflicting_request, bad_share_box (a sender
                that is not a neighbour, a box that does not open for this round, sender and
                recipient: the whole inbox is refused), too_few_neighbours (fewer than t senders:
                this device's own secrets could not be rebuilt if it dropped).
        """
        state = self._current(SHARED, inbox.round_id)
        if "inbox" in state:
            if ShareInbox.from_json(state["inbox"]) != inbox:
                raise SecAggRefused(CONFLICTING_REQUEST, f"round {inbox.round_id}: this device already received "
                                                         "another set of shares")
            return
        neighbours = NeighbourList.from_json(state["neighbours"])
        by_id = {entry.device_id: entry for entry in neighbours.neighbours}
        share_private = self._bytes(state, "share_private", 32)
        r, me = inbox.round_id, self.device_id
        held = {}
        for sender, box in sorted(inbox.boxes.items()):
            entry = by_id.get(sender)
            if entry is None:
                raise SecAggRefused(BAD_SHARE_BOX, f"round {r}: a box from {sender!r}, which is not a neighbour")
            key = key_agreement.derive_key(key_agreement.shared_secret(share_private, entry.share_key),
                                           purpose="shares", round_id=r, a=sender, b=me)
            try:
                plaintext = share_box.open_box(key, box, round_id=r, sender=sender, recipient=me)
                seed_share, key_share = share_box.unpack_shares(plaintext, round_id=r, sender=sender, recipient=me)
            except share_box.ShareBoxError as err:
                raise SecAggRefused(BAD_SHARE_BOX, f"round {r}: {err}") from None
            held[sender] = [b64encode(seed_share), b64encode(key_share)]
        if len(held) < neighbours.threshold:
            raise SecAggRefused(TOO_FEW_NEIGHBOURS, f"round {r}: {len(held)} neighbours shared, fewer than the "
                                                    f"threshold {neighbours.threshold}")
        state.update(inbox=inbox.to_json(), held=held)
        self._advance(state, RECEIVED)
        self._save(state)

    def mask(self, values: np.ndarray) -> np.ndarray:
        """y = x + PRG(b_u) + Σ_{v ∈ N∩U2, v > u} PRG(s_uv) − Σ_{v ∈ N∩U2, v < u} PRG(s_uv) mod 2^r.

        Ids are compared as Python strings; s_uv = derive_key(X25519(s_u, s_v), "mask", round,
        min(u, v), max(u, v)). The same x again gives the same y; another x (or length) is refused,
        since two masked inputs under one mask would give the server their difference.

        Args:
            values: x, a 1-D uint32 array with every value < 2^r.

        Raises:
            SecAggRefused: stage_order, conflicting_request.
            ValueError: `values` is not a 1-D uint32 array of values < 2^r.
        """
        state = self._current(RECEIVED)
        neighbours = NeighbourList.from_json(state["neighbours"])
        bits = neighbours.modulus_bits
        if not isinstance(values, np.ndarray) or values.dtype != np.uint32 or values.ndim != 1:
            raise ValueError("mask takes a 1-D uint32 array")
        if bits < 32 and values.size and int(values.max()) >> bits:
            raise ValueError(f"every value to mask must be < 2^{bits}")
        x = np.ascontiguousarray(values)
        digest = hashlib.sha256(x.tobytes()).hexdigest()
        if "masked" in state and state["masked"] != {"length": int(x.size), "sha256": digest}:
            raise SecAggRefused(CONFLICTING_REQUEST, f"round {state['round_id']}: this device already masked "
                                                     "another input")
        y = x.copy()
        prg.apply_mask(y, self._bytes(state, "self_seed", SEED_BYTES), bits)
        mask_private = self._bytes(state, "mask_private", 32)
        me, r = self.device_id, state["round_id"]
        by_id = {entry.device_id: entry for entry in neighbours.neighbours}
        for other in sorted(state["held"]):
            low, high = sorted((me, other))
            seed = key_agreement.derive_key(key_agreement.shared_secret(mask_private, by_id[other].mask_key),
                                            purpose="mask", round_id=r, a=low, b=high)
            prg.apply_mask(y, seed, bits, subtract=other < me)
        if "masked" not in state:
            state["masked"] = {"length": int(x.size), "sha256": digest}
            self._advance(state, MASKED)
            self._save(state)
        return y

    # -- stage 3 -----------------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """The share of b_v of every surviving neighbour and of s_v of every dropped one, never both.

        The answer is written before it is returned; asked again (after a restart too) the device
        gives the same answer, and refuses any other request for the round.

        Raises:
            SecAggRefused: stage_order (before `mask`), round_mismatch, conflicting_request,
                both_shares_requested, self_not_survivor, not_a_neighbour, incomplete_request,
                too_few_survivors.
        """
        state = self._current(MASKED, request.round_id)
        r, me = request.round_id, self.device_id
        if "request" in state:
            if _request_sets(UnmaskRequest.from_json(state["request"])) != _request_sets(request):
                raise SecAggRefused(CONFLICTING_REQUEST, f"round {r}: this device already answered another "
                                                         "unmask request")
            return UnmaskResponse.from_json(state["response"])
        survivors, dropped = _request_sets(request)
        both = survivors & dropped
        if both:
            raise SecAggRefused(BOTH_SHARES_REQUESTED, f"round {r}: {sorted(both)[0]!r} is named both survivor and "
                                                       "dropped")
        if me not in survivors:
            raise SecAggRefused(SELF_NOT_SURVIVOR, f"round {r}: the request does not list this device as a survivor")
        held = state["held"]  # N(u) ∩ U2
        others = (survivors - {me}) | dropped
        strangers = sorted(others - held.keys())
        if strangers:
            raise SecAggRefused(NOT_A_NEIGHBOUR, f"round {r}: {strangers[0]!r} is not a neighbour of this device "
                                                 "that shared")
        if others != held.keys():
            missing = sorted(held.keys() - others)
            raise SecAggRefused(INCOMPLETE_REQUEST, f"round {r}: the request leaves out neighbour {missing[0]!r}")
        threshold = state["neighbours"]["threshold"]
        if len(survivors) - 1 < threshold:
            raise SecAggRefused(TOO_FEW_SURVIVORS, f"round {r}: {len(survivors) - 1} neighbours survived, fewer "
                                                   f"than the threshold {threshold}")
        response = UnmaskResponse(
            round_id=r,
            self_seed_shares={v: b64decode(held[v][0], "share", "SecAgg state", size=shamir.SHARE_BYTES)
                              for v in sorted(survivors - {me})},
            mask_key_shares={v: b64decode(held[v][1], "share", "SecAgg state", size=shamir.SHARE_BYTES)
                             for v in sorted(dropped)})
        state.update(request=request.to_json(), response=response.to_json())
        self._advance(state, UNMASKED)
        self._save(state)
        return response
