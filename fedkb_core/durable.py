"""File helpers every part shares: durable writes, digests, output folders.

After `atomic_write` returns, a crash (even `kill -9` or power loss on a journaling file system)
leaves either the old file or the complete new one, never a torn one. `sha256_file` is the one
digest behind both stats.json's and the manifest's `tokenizer_sha256`, which are compared.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from fedkb_core.errors import FedkbError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_writable_folder(out: Path) -> None:
    """Create `out` if needed, or fail with one clear line before any long work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedkbError(f"{out}: cannot create the output folder ({err.strerror})") from None
    if not os.access(out, os.W_OK):
        raise FedkbError(f"{out}: the output folder is not writable")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview) -> Path:
    """Write `data` to `path` durably and atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
