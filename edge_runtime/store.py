"""The example store: what the user typed, kept on the device in one SQLite file.

Federated learning's privacy promise starts here: the raw text never leaves the device, only
clipped weight updates do (McMahan et al., 2017, https://arxiv.org/abs/1602.05629). Nothing in
this module talks to the network, and nothing else reads the file. Data minimisation is built
in: a retention policy removes messages older than `max_age_seconds` and, oldest first, keeps
the total under `max_bytes`; the user can delete everything, or everything since a moment, at
any time. `secure_delete` makes SQLite overwrite deleted rows instead of leaving them in free
pages.

Ids only grow (AUTOINCREMENT), so "new examples since the last job" is a cursor over ids that
deletions cannot confuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from datasets.tokenizer import encode_utterances
from datasets.windows import Windows, empty_windows, make_windows
from fedkb_core.errors import FedkbError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,          -- unix seconds
    text TEXT NOT NULL,
    bytes INTEGER NOT NULL,         -- UTF-8 size, what max_bytes counts
    source_key TEXT UNIQUE          -- set for imported lines, so re-importing a file adds nothing
);
CREATE INDEX IF NOT EXISTS examples_created ON examples(created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_TRAINED_CURSOR = "trained_up_to_id"


class ExampleSource(Protocol):
    """What the device's training cycle needs from its examples (`ExampleStore` is the phone's).

    Examples have growing integer ids; a job trains on everything up to `last_id()` and, once
    the server holds its update, marks it trained, which is what `new_examples` counts from. A
    fleet emulator provides its own source (a client's prepared text) so that a device trains on
    exactly the windows a reference implementation is given.
    """

    def enforce_retention(self) -> int:
        """Apply the retention policy; return how many examples it deleted."""

    def new_examples(self) -> int:
        """Examples added after the last job the server counted."""

    def last_id(self) -> int:
        """The newest id handed out so far (0: none yet)."""

    def token_windows(self, tokenizer, seq_len: int, *, up_to_id: int | None = None) -> Windows:
        """The training windows of the examples up to `up_to_id`, tokenized with the model's tokenizer."""

    def mark_trained(self, up_to_id: int) -> None:
        """Record that a counted job used every example up to `up_to_id`."""

    def delete_all(self) -> int:
        """The user's "delete my typing history"."""

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """How long and how much typed text the device keeps.

    Raises:
        ValueError: a limit that is not positive.
    """

    max_age_seconds: float = 30 * 86400.0  # a month: recent text is what predicts the next word
    max_bytes: int = 5_000_000  # ~50k messages; bounded storage on a small phone

    def __post_init__(self):
        if not (self.max_age_seconds > 0 and self.max_bytes > 0):
            raise ValueError("max_age_seconds and max_bytes must be positive")


class ExampleStore:
    """The typed messages of one device user (thread-safe; one connection, one lock).

    Args:
        path: the SQLite file (created with mode 0600).
        retention: the limits `enforce_retention` applies (also after every import).
        clock: unix seconds (injectable so tests can age the data).

    Raises:
        FedkbError: the file cannot be opened or is not an example store.
    """

    def __init__(self, path: Path | str, *, retention: RetentionPolicy = RetentionPolicy(),
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.retention = retention
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA secure_delete = ON")
            self._conn.executescript(_SCHEMA)
        except (OSError, sqlite3.DatabaseError) as err:
            raise FedkbError(f"{self.path}: cannot open the example store ({err})") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "ExampleStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Writing. --------------------------------------------------------------------------------
    def add(self, text: str, *, created: float | None = None) -> int | None:
        """Store one typed message; return its id (None for blank text, which is skipped)."""
        text = text.strip()
        if not text:
            return None
        with self._lock:
            cur = self._conn.execute("INSERT INTO examples(created, text, bytes) VALUES (?, ?, ?)",
                                     (self._clock() if created is None else created, text, len(text.encode())))
            return int(cur.lastrowid)

    def import_lines(self, lines: Iterable[str], *, source: str) -> int:
        """Import messages (one per line) from a named source; importing it again adds nothing.

        A line is recognised by (source, line number, text), so appending to a file imports
        only the new lines. Returns how many lines were added.
        """
        now = self._clock()
        rows = []
        for number, line in enumerate(lines):
            text = line.strip()
            if text:
                key = hashlib.sha256(f"{source}\0{number}\0{text}".encode()).hexdigest()
                rows.append((now, text, len(text.encode()), key))
        with self._lock, self._transaction():
            before = self._conn.total_changes
            self._conn.executemany(
                "INSERT OR IGNORE INTO examples(created, text, bytes, source_key) VALUES (?, ?, ?, ?)", rows)
            added = self._conn.total_changes - before
        self.enforce_retention()
        return added

    # Retention and deletion. -----------------------------------------------------------------
    def enforce_retention(self, now: float | None = None) -> int:
        """Delete messages past the age limit, then the oldest until under the size limit.

        Returns the number of messages deleted.
        """
        now = self._clock() if now is None else now
        with self._lock, self._transaction():
            deleted = self._conn.execute("DELETE FROM examples WHERE created < ?",
                                         (now - self.retention.max_age_seconds,)).rowcount
            total = self._conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM examples").fetchone()[0]
            if total > self.retention.max_bytes:
                # Walk from the newest down and keep what fits; everything older goes.
                kept, cutoff = 0, None
                for row_id, size in self._conn.execute("SELECT id, bytes FROM examples ORDER BY id DESC"):
                    if kept + size > self.retention.max_bytes:
                        cutoff = row_id
                        break
                    kept += size
                if cutoff is not None:
                    deleted += self._conn.execute("DELETE FROM examples WHERE id <= ?", (cutoff,)).rowcount
        return deleted

    def delete_all(self) -> int:
        """The user's "delete my typing history": every message, and the file shrinks."""
        with self._lock:
            deleted = self._conn.execute("DELETE FROM examples").rowcount
            self._conn.execute("VACUUM")
        return deleted

    def delete_since(self, since: float) -> int:
        """Delete messages typed at or after `since` (unix seconds), e.g. "the last hour"."""
        with self._lock:
            return self._conn.execute("DELETE FROM examples WHERE created >= ?", (since,)).rowcount

    # Reading. --------------------------------------------------------------------------------
    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0])

    def total_bytes(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM examples").fetchone()[0])

    def last_id(self) -> int:
        """The newest id ever handed out (0 for a new store), deleted rows included."""
        with self._lock:
            row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'examples'").fetchone()
            return int(row[0]) if row else 0

    def new_examples(self) -> int:
        """Messages stored after the last completed job (what eligibility's batching counts)."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM examples WHERE id > ?",
                                          (self._trained_cursor(),)).fetchone()[0])

    def mark_trained(self, up_to_id: int) -> None:
        """Record that a job used every message up to `up_to_id`."""
        with self._lock:
            self._conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                               "excluded.value", (_TRAINED_CURSOR, str(max(int(up_to_id), self._trained_cursor()))))

    def texts(self, *, up_to_id: int | None = None) -> list[str]:
        """The stored messages, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT text FROM examples WHERE id <= ? ORDER BY id",
                                      (up_to_id if up_to_id is not None else 1 << 62,)).fetchall()
        return [r[0] for r in rows]

    def token_windows(self, tokenizer, seq_len: int, *, up_to_id: int | None = None) -> Windows:
        """The training windows of the stored text: BOS/EOS-framed messages cut into [N, T]."""
        texts = self.texts(up_to_id=up_to_id)
        if not texts:
            return empty_windows(seq_len)
        return make_windows(encode_utterances(tokenizer, texts), seq_len)

    # Internals. ------------------------------------------------------------------------------
    def _trained_cursor(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (_TRAINED_CURSOR,)).fetchone()
        return int(row[0]) if row else 0

    def _transaction(self):
        return _Transaction(self._conn)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __enter__(self):
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self._conn.execute("ROLLBACK" if exc_type else "COMMIT")

