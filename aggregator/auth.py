"""Device tokens and secret checks: random, stored hashed, compared in constant time.

A device token is `<device_id>.<secret>`; the server keeps only sha256(token). The id part lets
the server find the row without using the secret as a lookup key, and the hash is then compared
with `hmac.compare_digest`. A plain sha256 (not a slow password hash) is enough because the
secret is 256 random bits, not something a person chose.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_device_id() -> str:
    return "d" + secrets.token_hex(8)


def new_token(device_id: str) -> str:
    """A fresh bearer token for one device (shown to it once)."""
    return f"{device_id}.{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def device_id_of(token: str) -> str | None:
    """The device id part of a token, or None if the token has no such part."""
    device_id, dot, rest = token.partition(".")
    return device_id if dot and device_id and rest else None


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token).encode(), stored_hash.encode())


def secret_matches(given: str | None, expected: str | None) -> bool:
    """Constant-time check of a shared secret; an unset expected secret matches nothing."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
