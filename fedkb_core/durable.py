"""File helpers every part shares: durable writes, digests, output folders.

Every file or folder that must appear whole is written here, nowhere else: into a temporary
sibling (`.<name>.<random>.tmp`), fsynced, renamed over its final name, and the parent folder
fsynced so the rename itself survives a power loss. After a writer returns, a crash (even
`kill -9`, or power loss on a journaling file system) leaves either the old file or the complete
new one, never a torn one; a writer that raises leaves the old file and no temporary behind. A
process killed mid-write can leave only a temporary, which `remove_temps` deletes at start-up.

`sha256_file` is the one digest behind both stats.json's and the manifest's `tokenizer_sha256`,
which are compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

from fedkb_core.errors import FedkbError

_TEMP_SUFFIX = ".tmp"


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


def temp_path(path: Path | str) -> Path:
    """A fresh temporary sibling of `path`, the name every writer here stages under."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")


def atomic_link(source: Path | str, dest: Path | str) -> None:
    """Make `dest` a hard link to the file at `source` in one step, replacing what was there:
    readers see the old file or the new one, never neither (a temporary link renamed over it).
    Callers that need it durable fsync the folder afterwards (`fsync_dir`)."""
    dest = Path(dest)
    link = temp_path(dest)
    os.link(source, link)
    try:
        os.replace(link, dest)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def leftover_temps(folder: Path | str, name: str = "*") -> list[Path]:
    """Temporaries (files or folders) in `folder` that a killed writer left, for `name` or any."""
    folder = Path(folder)
    return sorted(folder.glob(f".{name}.*{_TEMP_SUFFIX}")) if folder.is_dir() else []


def remove_temps(folder: Path | str, name: str = "*") -> None:
    """Delete what `leftover_temps` lists. Only safe while no writer of that folder runs."""
    for path in leftover_temps(folder, name):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path | str, mode: str = "wb", *, permissions: int = 0o644) -> Iterator[IO[Any]]:
    """Yield a file object whose contents replace `path` durably and atomically on a clean exit.

    For writers that stream (numpy's `savez`, `json.dump`): everything written to the yielded
    file appears at `path` at once, after an fsync. If the block raises, `path` is untouched and
    the temporary is removed.

    Args:
        mode: "wb" or "w" (text, UTF-8).
        permissions: of the new file (0o600 for secrets: it is never readable by others, not
            even for a moment).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes a whole file: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path | str, data: bytes | memoryview, *, permissions: int = 0o644) -> Path:
    """Write `data` to `path` durably and atomically."""
    with atomic_file(path, "wb", permissions=permissions) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str, *, permissions: int = 0o644) -> Path:
    return atomic_write(path, text.encode("utf-8"), permissions=permissions)


def atomic_write_json(path: Path | str, value: Any, *, indent: int | None = 2, permissions: int = 0o644) -> Path:
    """Write `value` as JSON (one trailing newline) durably and atomically."""
    return atomic_write_text(path, json.dumps(value, indent=indent) + "\n", permissions=permissions)


@contextmanager
def atomic_folder(final: Path | str, *, replace: bool = False,
                  lock: AbstractContextManager | None = None) -> Iterator[Path]:
    """Yield an empty staging folder that appears as `final`, complete, on a clean exit.

    On exit every file in the staging folder and the folder itself are fsynced, the folder is
    renamed to `final` and the parent fsynced: before the rename `final` does not exist, after
    it every file is there. If the block raises, the staging folder is deleted.

    Args:
        replace: delete a folder already at `final` first (a leftover nothing points to);
            without it an existing `final` is an error (FileExistsError).
        lock: held around that check and the rename (not while the block fills the folder).
    """
    final = Path(final)
    staging = temp_path(final)
    staging.mkdir()
    try:
        yield staging
        for entry in staging.iterdir():
            if entry.is_file() and not entry.is_symlink():
                fsync_file(entry)
        fsync_dir(staging)
        with lock if lock is not None else nullcontext():
            if final.exists():
                if not replace:
                    raise FileExistsError(f"{final} already exists")
                shutil.rmtree(final)
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(final.parent)
