"""AES-256-GCM boxes that carry one device's shares to one neighbour through the server.

In stage 1 a device Shamir-shares its self-mask seed b_u and its mask private key s_u among its
neighbours; the server relays the shares, so each neighbour's pair travels sealed under a key
only the two devices can derive (key_agreement.derive_key(purpose="shares"), sender → recipient).

Two bindings make a box useless anywhere but where it was meant to open:
  * the associated data, encode_fields(b"fedkb-secagg-shares-v1", round, sender, recipient):
    a box moved to another round, another pair or the other direction fails authentication;
  * the plaintext itself names the round, sender and recipient (`pack_shares`), and
    `unpack_shares` checks them: even if a device reused keys across rounds, a replayed box
    is refused.

Box layout: a 12-byte random nonce, then the GCM ciphertext with its 16-byte tag. Every key
seals one plaintext (it is derived per round, pair and direction), so random nonces are safe.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedkb_core.secagg.key_agreement import KEY_BYTES, check_device_id, check_round_id, encode_fields
from fedkb_core.secagg.shamir import SHARE_BYTES

NONCE_BYTES = 12
TAG_BYTES = 16
ASSOCIATED_DATA = b"fedkb-secagg-shares-v1"
MAX_ID_BYTES = 0xFFFF  # ids are length-prefixed with 2 bytes in the plaintext


class ShareBoxError(ValueError):
    """A box that does not open, or whose contents are not what this recipient expects."""


def _associated_data(round_id: int, sender: str, recipient: str) -> bytes:
    check_round_id(round_id)
    check_device_id(sender, what="sender id")
    check_device_id(recipient, what="recipient id")
    return encode_fields(ASSOCIATED_DATA, round_id, sender, recipient)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"a share box key is {KEY_BYTES} bytes (AES-256)")


def seal(key: bytes, plaintext: bytes, *, round_id: int, sender: str, recipient: str) -> bytes:
    """nonce ‖ AES-256-GCM(key, nonce, plaintext, associated data of round, sender, recipient).

    Raises:
        ValueError: a key that is not 32 bytes, a bad round id or an empty id.
    """
    _check_key(key)
    associated = _associated_data(round_id, sender, recipient)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, bytes(plaintext), associated)


def open_box(key: bytes, box: bytes, *, round_id: int, sender: str, recipient: str) -> bytes:
    """The plaintext of a box `seal`ed with the same key, round, sender and recipient.

    Raises:
        ShareBoxError: the box is too short or fails authentication (another key, round, sender
            or recipient, or tampered bytes).
        ValueError: a key that is not 32 bytes, a bad round id or an empty id.
    """
    _check_key(key)
    associated = _associated_data(round_id, sender, recipient)
    where = f"round {round_id} from {sender!r} to {recipient!r}"
    if not isinstance(box, bytes) or len(box) < NONCE_BYTES + TAG_BYTES:
        raise ShareBoxError(f"the share box does not open for {where}: too short to be a box")
    try:
        return AESGCM(key).decrypt(box[:NONCE_BYTES], box[NONCE_BYTES:], associated)
    except InvalidTag:
        raise ShareBoxError(f"the share box does not open for {where}: sealed under another key, round, "
                            "sender or recipient, or altered") from None


def _id_bytes(device_id: str, what: str) -> bytes:
    check_device_id(device_id, what=what)
    data = device_id.encode("utf-8")
    if len(data) > MAX_ID_BYTES:
        raise ValueError(f"a {what} is at most {MAX_ID_BYTES} bytes of UTF-8, got {len(data)}")
    return data


def pack_shares(sender: str, recipient: str, round_id: int, self_seed_share: bytes, mask_key_share: bytes) -> bytes:
    """The plaintext of one box: round (8 bytes big-endian), sender and recipient (each a 2-byte
    big-endian length and UTF-8), the share of the self-mask seed b_u, the share of the mask
    private key s_u (33 bytes each).

    Raises:
        ValueError: a bad round id, an empty or over-long id, a share that is not 33 bytes.
    """
    check_round_id(round_id)
    parts = [struct.pack(">Q", round_id)]
    for device_id, what in ((sender, "sender id"), (recipient, "recipient id")):
        data = _id_bytes(device_id, what)
        parts += [struct.pack(">H", len(data)), data]
    for share, what in ((self_seed_share, "self-mask seed share"), (mask_key_share, "mask key share")):
        if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
            raise ValueError(f"a {what} is {SHARE_BYTES} bytes")
        parts.append(share)
    return b"".join(parts)


def unpack_shares(plaintext: bytes, *, round_id: int, sender: str, recipient: str) -> tuple[bytes, bytes]:
    """(self-mask seed share, mask key share) of a `pack_shares` plaintext that names exactly this
    round, sender and recipient.

    Raises:
        ShareBoxError: not the layout, or a round, sender or recipient other than expected.
    """
    check_round_id(round_id)
    where = f"round {round_id} from {sender!r} to {recipient!r}"
    view, fields = memoryview(plaintext), []
    try:
        (packed_round,) = struct.unpack_from(">Q", view, 0)
        offset = 8
        for _ in range(2):
            (size,) = struct.unpack_from(">H", view, offset)
            offset += 2
            if offset + size > len(view):
                raise ValueError("an id runs past the end")
            fields.append(bytes(view[offset:offset + size]).decode("utf-8"))
            offset += size
    except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
        raise ShareBoxError(f"the shares for {where} are malformed") from None
    if len(view) - offset != 2 * SHARE_BYTES:
        raise ShareBoxError(f"the shares for {where} are malformed: {len(view) - offset} bytes of shares, "
                            f"not {2 * SHARE_BYTES}")
    if (packed_round, fields[0], fields[1]) != (round_id, sender, recipient):
        raise ShareBoxError(f"the shares for {where} name round {packed_round} from {fields[0]!r} to "
                            f"{fields[1]!r}: replayed or misrouted")
    shares = bytes(view[offset:])
    return shares[:SHARE_BYTES], shares[SHARE_BYTES:]
