"""The mask generator: a 32-byte seed expanded into uniform r-bit words by ChaCha20.

A device hides its r-bit integer update x under masks that are uniform modulo R = 2^r; the
server removes them once it knows the seeds (docs/secure_aggregation.md, stages 2 and 4). Both
ends must expand a seed to the same words on any machine, so the stream is fixed by algorithm:
the ChaCha20 keystream (RFC 8439's block function, via `cryptography`/OpenSSL) under the seed as
key with counter and nonce 0, read as little-endian uint32 words, each ANDed with 2^r − 1.
Keeping the low r bits of a uniform 32-bit word is exactly uniform modulo 2^r.

A fixed nonce is safe because no seed is expanded for two purposes: b_u is fresh per round and
s_uv is HKDF-derived with the round id and the pair (key_agreement.derive_key); the neighbour
graph's seed is read with a nonce of its own (graph.py).

Arithmetic is uint32 with wraparound, then the top bits masked: since 2^r divides 2^32, that is
arithmetic modulo 2^r, with no Python loop over coordinates (1.2 M words take a few ms).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
MAX_BITS = 32
_ZERO_NONCE = bytes(16)  # `cryptography`'s ChaCha20 nonce: 4-byte little-endian counter ‖ 12-byte nonce
_CHUNK_WORDS = 1024


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def check_seed(seed: bytes, *, what: str = "mask seed") -> None:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        got = f"{len(seed)} bytes" if isinstance(seed, (bytes, bytearray)) else type(seed).__name__
        raise ValueError(f"a {what} is {SEED_BYTES} bytes, got {got}")


def modulus_mask(bits: int) -> np.uint32:
    """2^bits − 1 as a uint32: ANDing with it reduces modulo 2^bits."""
    check_bits(bits)
    return np.uint32((1 << bits) - 1)


def keystream(seed: bytes, nbytes: int, *, nonce: bytes = _ZERO_NONCE) -> bytes:
    """The first `nbytes` of the ChaCha20 keystream of key `seed` and 16-byte `nonce` (as
    `cryptography` takes it: counter ‖ nonce)."""
    check_seed(seed, what="ChaCha20 key")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"a keystream length is an integer >= 0, got {nbytes!r}")
    return Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(nbytes))


def words(seed: bytes, *, nonce: bytes = _ZERO_NONCE) -> Iterator[int]:
    """The keystream of `keystream` as an endless iterator of uint32 words (Python ints), for
    draws whose count is not known in advance (rejection sampling)."""
    check_seed(seed, what="ChaCha20 key")
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    while True:
        yield from np.frombuffer(encryptor.update(bytes(4 * _CHUNK_WORDS)), dtype="<u4").tolist()


def expand(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` words uniform modulo 2^bits, determined by `seed` alone.

    Returns:
        A new, writable uint32 array of shape (length,), every value < 2^bits.

    Raises:
        ValueError: `seed` is not 32 bytes, `length` is negative, `bits` is not in 1..32.
    """
    check_seed(seed)
    mask = modulus_mask(bits)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"a mask length is an integer >= 0, got {length!r}")
    words = np.frombuffer(keystream(seed, 4 * length), dtype="<u4").astype(np.uint32)  # a native, writable copy
    if bits < MAX_BITS:
        words &= mask
    return words


def apply_mask(acc: np.ndarray, seed: bytes, bits: int, *, subtract: bool = False) -> None:
    """acc ← acc ± expand(seed, len(acc), bits) modulo 2^bits, in place.

    `acc` must be a writable 1-D uint32 array; its values need not be reduced beforehand (the
    result is reduced). Adding then subtracting one seed's mask restores acc modulo 2^bits.

    Raises:
        ValueError: `acc` is not a writable 1-D uint32 array, or a bad seed or bits.
    """
    if not (isinstance(acc, np.ndarray) and acc.dtype == np.uint32 and acc.ndim == 1 and acc.flags.writeable):
        if isinstance(acc, np.ndarray):
            got = f"{'' if acc.flags.writeable else 'read-only '}{acc.dtype} array of shape {acc.shape}"
        else:
            got = type(acc).__name__
        raise ValueError(f"masks apply to a writable 1-D uint32 array, got a {got}")
    mask = expand(seed, acc.size, bits)
    if subtract:
        np.subtract(acc, mask, out=acc)
    else:
        np.add(acc, mask, out=acc)
    acc &= modulus_mask(bits)
