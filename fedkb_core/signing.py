"""Signed model versions: the server signs each manifest, the device trusts only pinned keys.

The sha256s in a manifest prove that the files are the ones the manifest lists, but nothing
proves the manifest itself came from the fleet's server: anyone who can answer the device's
requests (a compromised proxy, a hostile network, a server bug) could list files of their own.
So the server signs the exact bytes of every `manifest.json` it publishes with Ed25519 (RFC 8032,
via the `cryptography` package) and serves the detached signature as `manifest.sig` beside it;
the device verifies that signature against public keys it pinned before it reads anything else
of the version. The files then follow from the manifest's sha256s.

`manifest.sig` is a small JSON object, `{"algorithm": "ed25519", "key_id": ID, "signature": B64}`,
where ID is the first 16 hex digits of sha256 of the raw 32-byte public key. The key id is what
makes rotation possible: a device holds a set of trusted keys (`TrustedKeys`) and picks the one
the signature names, so an app can ship the next key before the server starts using it.

The signing key lives in the server's state folder as `signing_key.pem` (PKCS #8, mode 0600),
created on first use; `public_key.pem` beside it is what an operator hands to the app.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import fcntl
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedkb_core.durable import atomic_write
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import MANIFEST_FILE

SIGNATURE_FILE = "manifest.sig"
SIGNING_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "public_key.pem"
ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 1024  # a manifest.sig is ~150 bytes; anything far larger is not one
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


class SignatureError(FedkbError):
    """A manifest that is unsigned, signed by a key the device does not trust, or tampered with."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclasses.dataclass(frozen=True)
class ManifestSignature:
    """A detached signature over a manifest's exact bytes, and the id of the key that made it."""

    key_id: str
    signature: bytes

    def to_bytes(self) -> bytes:
        return json.dumps({"algorithm": ALGORITHM, "key_id": self.key_id,
                           "signature": base64.b64encode(self.signature).decode()}).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = SIGNATURE_FILE) -> "ManifestSignature":
        """Parse a `manifest.sig`.

        Raises:
            SignatureError: not the JSON object described in the module docstring.
        """
        if len(data) > MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{where}: {len(data)} bytes is not a signature")
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or body.get("algorithm") != ALGORITHM:
                raise ValueError(f"algorithm must be {ALGORITHM!r}")
            kid, sig = body["key_id"], base64.b64decode(body["signature"], validate=True)
            if not isinstance(kid, str) or len(sig) != 64:
                raise ValueError("key_id must be a string and the signature 64 bytes")
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as err:
            raise SignatureError(f"{where}: malformed signature ({err})") from None
        return cls(key_id=kid, signature=sig)


class ManifestSigner:
    """The server's side: signs manifest bytes with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    def sign(self, manifest_bytes: bytes) -> ManifestSignature:
        return ManifestSignature(self.key_id, self._key.sign(manifest_bytes))

    def public_pem(self) -> bytes:
        return public_key_pem(self.public_key)


def load_or_create_signing_key(folder: Path | str) -> ManifestSigner:
    """The signer of a state folder, creating `signing_key.pem` (0600) on first use.

    Safe when several processes (gunicorn workers) start together: creation happens under an
    exclusive lock on `signing_key.lock`, so exactly one key is made and everyone loads it.
    `public_key.pem` is (re)written beside it.

    Raises:
        FedkbError: the key file exists but is not an Ed25519 private key.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SIGNING_KEY_FILE
    with open(folder / "signing_key.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            atomic_write(path, pem, permissions=0o600)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise FedkbError(f"{path}: not a PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FedkbError(f"{path}: not an Ed25519 private key")
    signer = ManifestSigner(key)
    public = folder / PUBLIC_KEY_FILE
    if not public.is_file() or public.read_bytes() != signer.public_pem():
        atomic_write(public, signer.public_pem())
    return signer


def sign_folder(folder: Path | str, signer: ManifestSigner) -> Path:
    """Write `manifest.sig` for the `manifest.json` in `folder` (durably, atomically)."""
    folder = Path(folder)
    return atomic_write(folder / SIGNATURE_FILE, signer.sign((folder / MANIFEST_FILE).read_bytes()).to_bytes())


class TrustedKeys:
    """The public keys a device accepts manifests from, by key id (more than one during rotation)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]):
        self._keys = {key_id(k): k for k in keys}
        if not self._keys:
            raise FedkbError("no trusted model signing key given")

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    @classmethod
    def from_pem(cls, data: bytes, *, where: str = "public key") -> "TrustedKeys":
        """Every `PUBLIC KEY` PEM block in `data` (one file may hold the current and the next key).

        Raises:
            FedkbError: no block, or a block that is not an Ed25519 public key.
        """
        keys = []
        for block in _PEM_BLOCK.findall(data):
            try:
                key = serialization.load_pem_public_key(block)
            except (ValueError, TypeError) as err:
                raise FedkbError(f"{where}: not a PEM public key ({err})") from None
            if not isinstance(key, Ed25519PublicKey):
                raise FedkbError(f"{where}: not an Ed25519 public key")
            keys.append(key)
        if not keys:
            raise FedkbError(f"{where}: holds no PEM public key")
        return cls(keys)

    @classmethod
    def from_files(cls, paths: Iterable[Path | str]) -> "TrustedKeys":
        keys: list[Ed25519PublicKey] = []
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise FedkbError(f"{path}: cannot read the model signing key ({err.strerror})") from None
            keys.extend(cls.from_pem(data, where=str(path))._keys.values())
        return cls(keys)

    def to_pem(self) -> bytes:
        return b"".join(public_key_pem(self._keys[k]) for k in self.key_ids)

    def verify(self, manifest_bytes: bytes, signature_bytes: bytes | None, *, where: str = "manifest") -> str:
        """Check that `signature_bytes` is a trusted key's signature of exactly `manifest_bytes`.

        Returns:
            The id of the key that signed it.

        Raises:
            SignatureError: no signature, a malformed one, an unknown key, or bytes that differ
                from what was signed.
        """
        if signature_bytes is None:
            raise SignatureError(f"{where}: unsigned (no {SIGNATURE_FILE}); only signed versions are accepted")
        signature = ManifestSignature.from_bytes(signature_bytes, where=f"{where} signature")
        key = self._keys.get(signature.key_id)
        if key is None:
            raise SignatureError(f"{where}: signed by key {signature.key_id!r}, which this device does not trust "
                                 f"(trusted: {', '.join(self.key_ids)})")
        try:
            key.verify(signature.signature, manifest_bytes)
        except InvalidSignature:
            raise SignatureError(f"{where}: the signature does not match the manifest (tampered with, or "
                                 "signed by another key with the same id)") from None
        return signature.key_id
