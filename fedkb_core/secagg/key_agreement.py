"""X25519 key agreement and the HKDF keys of a SecAgg round.

Each device draws two X25519 key pairs per round (docs/secure_aggregation.md, stage 0): one to
agree on share-encryption keys ("c"), one to agree on pairwise mask seeds ("s"). Two devices that
hold each other's public keys compute the same 32-byte shared secret; neither the secret nor a
key derived from it is ever used directly. Every key is HKDF-SHA256 (RFC 5869) of the secret
with an `info` that binds:

  * `purpose`: "mask" (the seed of the pairwise mask s_uv) or "shares" (the AES key of the
    box carrying a device's shares to a neighbour), so one secret never yields the same key for
    two uses;
  * the round id, so keys (and mask seeds) of different rounds are unrelated even if a device
    reused a key pair;
  * the two device ids: for "mask" in sorted order (both ends must derive the same seed, and
    the mask is added by one and subtracted by the other), for "shares" as (sender, recipient),
    so the two directions of a pair use different keys.

Every field of `info` is length-prefixed (`encode_fields`), so no two different tuples encode
to the same bytes (without it, ids "ab" + "c" and "a" + "bc" would collide).

A low-order peer public key (one of the few points of order dividing 8 or their twist
equivalents) makes X25519 output all zeros whatever the private key, a secret the attacker
knows; `cryptography` refuses it with a bare ValueError, turned here into `BadPublicKey`.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
PROTOCOL = b"fedkb-secagg-v1"
PURPOSES = ("mask", "shares")
MAX_ROUND_ID = (1 << 63) - 1  # round ids are SQLite int64 rows
_LENGTH_BYTES = 4


class BadPublicKey(ValueError):
    """A peer public key that is not 32 bytes or would give a shared secret known to anyone."""


def encode_fields(*fields: bytes | str | int) -> bytes:
    """An unambiguous byte string of `fields`: each as a 4-byte big-endian length, then its bytes
    (str as UTF-8, int as 8 bytes big-endian, unsigned).

    Raises:
        ValueError: an int outside 0..2^64 − 1, a str that is not valid Unicode, another type.
    """
    out = bytearray()
    for field in fields:
        if isinstance(field, bytes):
            data = field
        elif isinstance(field, str):
            try:
                data = field.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"{field!r} is not valid Unicode ({err.reason})") from None
        elif isinstance(field, int) and not isinstance(field, bool):
            if not 0 <= field < 1 << 64:
                raise ValueError(f"an integer field must be in 0..2^64 - 1, got {field}")
            data = field.to_bytes(8, "big")
        else:
            raise ValueError(f"a field is bytes, str or int, got {type(field).__name__}")
        out += len(data).to_bytes(_LENGTH_BYTES, "big") + data
    return bytes(out)


def check_round_id(round_id: int) -> None:
    if isinstance(round_id, bool) or not isinstance(round_id, int) or not 0 <= round_id <= MAX_ROUND_ID:
        raise ValueError(f"a round id is an integer in 0..2^63 - 1, got {round_id!r}")


def check_device_id(device_id: str, *, what: str = "device id") -> None:
    if not isinstance(device_id, str) or not device_id:
        raise ValueError(f"a {what} is a non-empty string, got {device_id!r}")


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """One X25519 key pair as raw 32-byte strings (the private half is kept out of `repr`)."""

    private: bytes = dataclasses.field(repr=False)
    public: bytes

    @classmethod
    def generate(cls) -> "KeyPair":
        return cls.from_private(X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private(cls, private: bytes) -> "KeyPair":
        """The pair of a stored private key (e.g. one reloaded after a restart).

        Raises:
            ValueError: `private` is not 32 bytes.
        """
        public = _private_key(private).public_key().public_bytes_raw()
        return cls(private=bytes(private), public=public)


def _private_key(private: bytes) -> X25519PrivateKey:
    if not isinstance(private, bytes) or len(private) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} raw bytes")
    return X25519PrivateKey.from_private_bytes(private)


# Every low-order point is refused whatever the private key: X25519 clamps the scalar to a
# multiple of 8, so k·P is the identity for every P of order dividing 8 (on the curve) or 4 (on
# the twist), and for no other P (their other prime factors exceed any clamped scalar / 8).
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, KEY_BYTES + 1)))


def check_public_key(raw: bytes) -> None:
    """Refuse what cannot be a usable peer key: not 32 bytes, or a low-order point.

    Cheap (one X25519 operation), so a server can refuse a bad key when a device advertises it
    rather than when its neighbours first use it.

    Raises:
        BadPublicKey: with the reason.
    """
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        got = f"{len(raw)} bytes" if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
        raise BadPublicKey(f"an X25519 public key is {KEY_BYTES} raw bytes, got {got}")
    _exchange(_PROBE, raw)


def _exchange(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise BadPublicKey(f"public key {peer_public.hex()} is a low-order point: the shared secret would be "
                           "all zeros, known to anyone") from None


def shared_secret(private: bytes, peer_public: bytes) -> bytes:
    """The 32-byte X25519 secret of our `private` key and a peer's raw public key.

    Raises:
        BadPublicKey: `peer_public` is not 32 bytes or is a low-order point.
        ValueError: `private` is not 32 bytes.
    """
    key = _private_key(private)
    check_public_key(peer_public)
    return _exchange(key, peer_public)


def derive_key(secret: bytes, *, purpose: str, round_id: int, a: str, b: str) -> bytes:
    """HKDF-SHA256 (no salt) of a shared secret into a 32-byte key for one purpose, round and pair.

    `info` = encode_fields(PROTOCOL, purpose, round_id, a, b). Callers pass, for purpose "mask",
    the two device ids sorted (as Python strings, i.e. by code point), and for "shares",
    a = sender, b = recipient.

    Raises:
        ValueError: `secret` is not 32 bytes; `purpose` is not "mask" or "shares"; a bad round
            id; an empty id; a == b; for "mask", a > b (unsorted ids would give the two ends
            different seeds and masks that never cancel).
    """
    if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
        raise ValueError(f"a shared secret is {KEY_BYTES} bytes")
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    check_round_id(round_id)
    check_device_id(a)
    check_device_id(b)
    if a == b:
        raise ValueError(f"a key is derived for two different devices, got {a!r} twice")
    if purpose == "mask" and a > b:
        raise ValueError(f"a mask key takes the two ids sorted: ({b!r}, {a!r}), not ({a!r}, {b!r})")
    info = encode_fields(PROTOCOL, purpose, round_id, a, b)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)
