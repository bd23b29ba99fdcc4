"""SQLite persistence: schema, one connection per request on `g`, and the queries.

WAL mode lets readers (status, check-ins) run beside the one writer; `synchronous=FULL` makes a
committed accept durable before the server answers. Writers use `BEGIN IMMEDIATE`, so the check
"is the round still open?" and the write that depends on it happen under the same lock, across
threads and gunicorn worker processes alike. Autocommit mode (`isolation_level=None`) keeps the
transactions exactly where `transaction()` puts them.

Request threads that write (check-in assignments, accepts) go through `GroupCommit`: the writes of
every thread waiting at that moment run in one `BEGIN IMMEDIATE … COMMIT`, each under its own
savepoint, so many requests share one durable commit (one fsync of the WAL) and wait on a
condition variable instead of SQLite's busy-handler sleeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from flask import Flask, current_app, g

from aggregator.rounds import ACTIVE_STATES, RoundRecord
from aggregator.secagg_store import SCHEMA as SECAGG_SCHEMA
from fedkb_core.durable import fsync_dir
from fedkb_core.protocol import INT64_MAX

DB_FILE = "fedkb.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    platform TEXT NOT NULL,
    enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    parent_version INTEGER,
    round_id INTEGER,
    created_at REAL NOT NULL,
    num_clients INTEGER NOT NULL DEFAULT 0,
    total_examples INTEGER NOT NULL DEFAULT 0,
    publish_seconds REAL,
    eval_json TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version INTEGER NOT NULL,
    state TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    min_clients INTEGER NOT NULL,
    goal_clients INTEGER NOT NULL,
    max_assigned INTEGER NOT NULL,
    clip_norm REAL NOT NULL,
    learning_rate REAL NOT NULL,
    epochs INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    max_examples INTEGER NOT NULL,
    encoding TEXT NOT NULL,
    update_bits INTEGER,
    rotation_seed INTEGER,
    assigned INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0,
    folded INTEGER NOT NULL DEFAULT 0,
    total_examples INTEGER NOT NULL DEFAULT 0,
    closed_at REAL,
    outcome TEXT,
    published_version INTEGER,
    aggregate_seconds REAL,
    publish_seconds REAL,
    dp_noise_multiplier REAL,
    dp_update_noise_multiplier REAL,
    dp_clipped_count_stddev REAL,
    dp_denominator INTEGER,
    dp_unclipped_fraction REAL,
    dp_next_clip_norm REAL,
    secagg_modulus_bits INTEGER,
    secagg_steps TEXT,
    secagg_block_rms TEXT,
    secagg_dropped_blocks TEXT
);
CREATE TABLE IF NOT EXISTS dp_noise_seeds (
    round_id INTEGER PRIMARY KEY,
    seed TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dp_tree_seeds (
    tree_index INTEGER PRIMARY KEY,
    seed TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    assigned_at REAL NOT NULL,
    report_by REAL,
    reclaimed_at REAL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    update_norm REAL NOT NULL,
    device_norm REAL NOT NULL,
    body_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    blob TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    UNIQUE (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS rejections (
    round_id INTEGER NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (round_id, reason)
);
""" + SECAGG_SCHEMA  # secure aggregation's cohort tables (aggregator/secagg_store.py)


def connect(state_dir: Path, *, busy_timeout: float = 30.0) -> sqlite3.Connection:
    """A connection in autocommit mode with WAL, full sync and a generous busy timeout (seconds)."""
    conn = sqlite3.connect(Path(state_dir) / DB_FILE, isolation_level=None, timeout=busy_timeout,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return conn


def init_db(state_dir: Path) -> None:
    """Create the database and tables if absent (idempotent; safe from several processes)."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    conn = connect(state_dir)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        with transaction(conn):  # under the write lock: gunicorn workers may start together
            _add_missing_columns(conn)
    finally:
        conn.close()


# Columns added after the first release, for state folders created before them.
_ADDED_COLUMNS = {"tasks": (("report_by", "REAL"), ("reclaimed_at", "REAL")),
                  "rounds": (("dp_noise_multiplier", "REAL"), ("dp_update_noise_multiplier", "REAL"),
                             ("dp_clipped_count_stddev", "REAL"), ("dp_denominator", "INTEGER"),
                             ("dp_unclipped_fraction", "REAL"), ("dp_next_clip_norm", "REAL"),
                             ("update_bits", "INTEGER"), ("rotation_seed", "INTEGER"),
                             ("secagg_modulus_bits", "INTEGER"), ("secagg_steps", "TEXT"),
                             ("secagg_block_rms", "TEXT"), ("secagg_dropped_blocks", "TEXT"))}


def _add_missing_columns(conn) -> None:
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def get_db() -> sqlite3.Connection:
    """The request's connection, opened on first use and closed at teardown."""
    if "db" not in g:
        g.db = connect(current_app.extensions["fedkb"].config.state_dir)
    return g.db


def _close_db(_exc=None) -> None:
    conn = g.pop("db", None)
    if conn is not None:
        conn.close()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(_close_db)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


T = TypeVar("T")


class _Work:
    """One thread's write, waiting for the commit that makes it durable."""

    __slots__ = ("fn", "sync_dirs", "done", "value", "error")

    def __init__(self, fn, sync_dirs):
        self.fn, self.sync_dirs = fn, sync_dirs
        self.done, self.value, self.error = False, None, None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.value


class GroupCommit:
    """Group commit: concurrent write transactions of one process share one BEGIN … COMMIT.

    `run(fn)` queues `fn(conn)`. The first waiting thread becomes the leader: it takes every
    queued write, fsyncs the folders they ask for (`sync_dirs`), runs each write under its own
    SAVEPOINT in one `BEGIN IMMEDIATE` transaction on its own connection, and COMMITs; threads
    that queue meanwhile form the next batch. Each caller gets its own result, or its own
    exception with its own writes rolled back to its savepoint, and only after the COMMIT that
    holds (or dropped) its writes returned. With synchronous=FULL that COMMIT has fsynced the WAL,
    so a caller that answers "accepted" after `run` returns answers only for a durable row. If the
    COMMIT fails, every caller of the batch gets that error and none of its writes exists.

    Why: with one transaction per request, 16 upload threads took turns at one WAL fsync each
    (10–15 ms while blob fsyncs keep the disk busy) and the losers slept in SQLite's busy handler
    (1, 2, 5, 10 … 100 ms), so the SQLite lock, not the CPU, capped accepts at ~60/s.

    A write function may run in another request's thread: it must only use the connection it is
    given (no Flask request state), must not commit or call `run`, and should be short (it runs
    while the SQLite write lock is held). Processes (gunicorn workers) each have their own
    GroupCommit; SQLite's lock orders them as before.
    """

    def __init__(self, state_dir: Path, *, busy_timeout: float = 30.0):
        self.state_dir = Path(state_dir)
        self.busy_timeout = busy_timeout  # how long BEGIN IMMEDIATE waits for another process's lock
        self._cond = threading.Condition()
        self._queue: list[_Work] = []
        self._leading = False
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self.batches = 0  # commits made, and writes they carried (for tests and the bench)
        self.writes = 0

    def run(self, fn: Callable[[sqlite3.Connection], T], *, sync_dirs: Iterable[Path] = ()) -> T:
        """Run `fn(conn)` in a shared write transaction; return its result once committed.

        Args:
            fn: the write; its exception is re-raised here (after its savepoint was rolled back).
            sync_dirs: folders to fsync before the commit (new blob names the row will point to).

        Raises:
            whatever `fn` raised, or the error that made the shared BEGIN or COMMIT fail.
        """
        work = _Work(fn, tuple(sync_dirs))
        with self._cond:
            self._queue.append(work)
            while self._leading and not work.done:
                self._cond.wait()
            if work.done:
                return work.outcome()
            self._leading = True
            batch, self._queue = self._queue, []
        try:
            self._commit(batch)
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()
        return work.outcome()

    def pending(self) -> int:
        """Writes queued for the next commit (they wait while another batch commits)."""
        with self._cond:
            return len(self._queue)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never reuse a connection across fork
            self._conn, self._pid = connect(self.state_dir, busy_timeout=self.busy_timeout), os.getpid()
        return self._conn

    def _commit(self, batch: list[_Work]) -> None:
        results = []
        try:
            for folder in dict.fromkeys(d for w in batch for d in w.sync_dirs):
                fsync_dir(folder)
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for work in batch:
                    conn.execute("SAVEPOINT write")
                    try:
                        value = work.fn(conn)
                    except Exception as err:  # this write alone is undone; the others go on
                        conn.execute("ROLLBACK TO write")
                        conn.execute("RELEASE write")
                        results.append((None, err))
                    else:
                        conn.execute("RELEASE write")
                        results.append((value, None))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException as err:  # nothing of this batch was committed
            self._drop_connection()
            results = [(None, err)] * len(batch)
        self.batches += 1
        self.writes += len(batch)
        for work, (value, error) in zip(batch, results):
            work.value, work.error, work.done = value, error, True

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def close(self) -> None:
        """Close the connection (at shutdown); a commit under way keeps it until it is done."""
        with self._cond:
            while self._leading:
                self._cond.wait()
            self._drop_connection()


# Devices.

def add_device(conn, device_id: str, token_hash: str, platform: str) -> None:
    conn.execute("INSERT INTO devices (id, token_hash, platform, enrolled_at) VALUES (?, ?, ?, ?)",
                 (device_id, token_hash, platform, time.time()))


def device_token_hash(conn, device_id: str) -> str | None:
    row = conn.execute("SELECT token_hash FROM devices WHERE id = ?", (device_id,)).fetchone()
    return None if row is None else row["token_hash"]


# Rounds.

_ROUND_FIELDS = tuple(f.name for f in dataclasses.fields(RoundRecord))


def _round(row) -> RoundRecord | None:
    return None if row is None else RoundRecord(**{k: row[k] for k in _ROUND_FIELDS})


def get_round(conn, round_id: int) -> RoundRecord | None:
    """The round, or None (also for an id no SQLite integer can be, such as one from a URL)."""
    if not 0 <= round_id <= INT64_MAX:
        return None
    return _round(conn.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone())


def active_round(conn) -> RoundRecord | None:
    """The open or closing round, if any (there is at most one)."""
    marks = ",".join("?" * len(ACTIVE_STATES))
    return _round(conn.execute(f"SELECT * FROM rounds WHERE state IN ({marks}) ORDER BY id DESC LIMIT 1",
                               ACTIVE_STATES).fetchone())


def recent_rounds(conn, limit: int = 20) -> list[RoundRecord]:
    return [_round(r) for r in conn.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT ?", (limit,))]


def insert_round(conn, settings: dict) -> int:
    cols = ",".join(settings)
    cur = conn.execute(f"INSERT INTO rounds ({cols}) VALUES ({','.join('?' * len(settings))})", tuple(settings.values()))
    return int(cur.lastrowid)


def update_round(conn, round_id: int, **fields) -> None:
    sets = ",".join(f"{k} = ?" for k in fields)
    conn.execute(f"UPDATE rounds SET {sets} WHERE id = ?", (*fields.values(), round_id))


# Tasks and updates.

def has_task(conn, round_id: int, device_id: str) -> bool:
    """Whether the device holds a live task (not reclaimed) for the round."""
    return conn.execute("SELECT 1 FROM tasks WHERE round_id = ? AND device_id = ? AND reclaimed_at IS NULL",
                        (round_id, device_id)).fetchone() is not None


def task_of(conn, round_id: int, device_id: str):
    """The device's task row for the round (`report_by`, `reclaimed_at`), or None."""
    return conn.execute("SELECT report_by, reclaimed_at FROM tasks WHERE round_id = ? AND device_id = ?",
                        (round_id, device_id)).fetchone()


def add_task(conn, round_id: int, device_id: str, report_by: float | None = None) -> None:
    conn.execute("INSERT INTO tasks (round_id, device_id, assigned_at, report_by) VALUES (?, ?, ?, ?)",
                 (round_id, device_id, time.time(), report_by))
    conn.execute("UPDATE rounds SET assigned = assigned + 1 WHERE id = ?", (round_id,))


_OVERDUE = ("FROM tasks WHERE round_id = ? AND reclaimed_at IS NULL AND report_by <= ?"
            " AND device_id NOT IN (SELECT device_id FROM updates WHERE round_id = ?)")


def has_overdue_tasks(conn, round_id: int, now: float) -> bool:
    """Whether a device holds a task of the round past its report-by time without having reported."""
    return conn.execute(f"SELECT 1 {_OVERDUE} LIMIT 1", (round_id, now, round_id)).fetchone() is not None


def reclaim_overdue_tasks(conn, round_id: int, now: float) -> int:
    """Take back the slots of tasks past their report-by time without an update; return how many.

    The rows stay (marked `reclaimed_at`), so their devices get no second task in the round.
    """
    n = conn.execute(f"UPDATE tasks SET reclaimed_at = ? WHERE rowid IN (SELECT rowid {_OVERDUE})",
                     (now, round_id, now, round_id)).rowcount
    if n:
        conn.execute("UPDATE rounds SET assigned = MAX(0, assigned - ?) WHERE id = ?", (n, round_id))
    return n


def find_update(conn, round_id: int, device_id: str):
    return conn.execute("SELECT * FROM updates WHERE round_id = ? AND device_id = ?", (round_id, device_id)).fetchone()


def add_update(conn, *, round_id: int, device_id: str, num_examples: int, update_norm: float, device_norm: float,
               body_sha256: str, size: int, blob: str) -> int:
    cur = conn.execute(
        "INSERT INTO updates (round_id, device_id, num_examples, update_norm, device_norm, body_sha256, bytes, blob,"
        " accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (round_id, device_id, num_examples, update_norm, device_norm, body_sha256, size, blob, time.time()))
    return int(cur.lastrowid)


def updates_after(conn, round_id: int, after_id: int, limit: int) -> list:
    return conn.execute("SELECT id, round_id, device_id, bytes, blob, num_examples, device_norm FROM updates"
                        " WHERE round_id = ? AND id > ? ORDER BY id LIMIT ?", (round_id, after_id, limit)).fetchall()


def drop_update(conn, update_id: int) -> None:
    """Forget an accepted update (its blob was quarantined): it no longer counts anywhere."""
    conn.execute("DELETE FROM updates WHERE id = ?", (update_id,))


def update_norms(conn, round_id: int, limit: int = 2000) -> list[float]:
    return [r[0] for r in conn.execute("SELECT update_norm FROM updates WHERE round_id = ? ORDER BY id LIMIT ?",
                                       (round_id, limit))]


def last_closed_round(conn) -> RoundRecord | None:
    """The most recent round that published a version (abandoned ones released nothing)."""
    return _round(conn.execute("SELECT * FROM rounds WHERE state = 'closed' ORDER BY id DESC LIMIT 1").fetchone())


def last_secagg_measurements(conn, count: int) -> list[RoundRecord]:
    """The `count` most recent SecAgg rounds whose sums were measured (released, or refused as
    overflowing), newest first: what a tuned grid's next steps follow."""
    rows = conn.execute("SELECT * FROM rounds WHERE secagg_block_rms IS NOT NULL ORDER BY id DESC LIMIT ?",
                        (int(count),)).fetchall()
    return [_round(row) for row in rows]


# Differential privacy: a round's noise seed lives in its own table, never in the round's record
# (which /v1/status shows): with the seed and the published model anyone could subtract the noise.

def noise_seed(conn, round_id: int) -> str | None:
    row = conn.execute("SELECT seed FROM dp_noise_seeds WHERE round_id = ?", (round_id,)).fetchone()
    return None if row is None else row["seed"]


def keep_noise_seed(conn, round_id: int, seed: str) -> str:
    """Record the round's seed unless one is recorded already; return the one that holds."""
    conn.execute("INSERT OR IGNORE INTO dp_noise_seeds (round_id, seed) VALUES (?, ?)", (round_id, seed))
    return noise_seed(conn, round_id)


def forget_noise_seed(conn, round_id: int) -> None:
    conn.execute("DELETE FROM dp_noise_seeds WHERE round_id = ?", (round_id,))


# DP-FTRL: one seed per noise tree, kept for the tree's whole life (every release re-derives the
# noise of the nodes it shares with earlier ones) and forgotten once the tree has restarted.

def keep_tree_seed(conn, tree_index: int, seed: str) -> str:
    """Record the tree's seed unless one is recorded already; return the one that holds."""
    conn.execute("INSERT OR IGNORE INTO dp_tree_seeds (tree_index, seed) VALUES (?, ?)", (tree_index, seed))
    return conn.execute("SELECT seed FROM dp_tree_seeds WHERE tree_index = ?", (tree_index,)).fetchone()["seed"]


def forget_tree_seeds_before(conn, tree_index: int) -> None:
    conn.execute("DELETE FROM dp_tree_seeds WHERE tree_index < ?", (tree_index,))


def releases_before(conn, round_id: int) -> int:
    """How many rounds before this one released a version: the round's release number (abandoned
    rounds release nothing and do not count)."""
    return conn.execute("SELECT COUNT(*) FROM rounds WHERE state = 'closed' AND id < ?", (round_id,)).fetchone()[0]


def last_contribution(conn, device_id: str) -> int | None:
    """The id of the last released round whose sum included an update of this device, or None."""
    return conn.execute("SELECT MAX(r.id) FROM updates u JOIN rounds r ON r.id = u.round_id"
                        " WHERE u.device_id = ? AND r.state = 'closed'", (device_id,)).fetchone()[0]


# Counters saturate at 2^53: exact as a JSON number in any reader (a browser's too), far above
# anything real (9 PB of uploads), and no sum of them can overflow SQLite's 64-bit SUM().
COUNTER_CAP = 1 << 53


def _counter(value) -> int:
    """A stored counter or a sum of them, as a bounded int (rows written before the cap existed
    may hold anything up to 2^63 - 1; `TOTAL()` adds them as floats, which never overflows)."""
    return int(min(max(value or 0, 0), COUNTER_CAP))


def count_rejection(conn, round_id: int, reason: str, size: int) -> None:
    """Count one refused request and the bytes actually read of it (never a claimed length)."""
    size = _counter(size)
    conn.execute("INSERT INTO rejections (round_id, reason, count, bytes) VALUES (?, ?, 1, ?) "
                 "ON CONFLICT (round_id, reason) DO UPDATE SET count = MIN(count + 1, ?), "
                 "bytes = MIN(bytes + excluded.bytes, ?)",
                 (round_id, reason, size, COUNTER_CAP, COUNTER_CAP))


def rejections(conn, round_id: int | None = None) -> dict[str, int]:
    if round_id is None:
        rows = conn.execute("SELECT reason, TOTAL(count) FROM rejections GROUP BY reason")
    else:
        rows = conn.execute("SELECT reason, count FROM rejections WHERE round_id = ?", (round_id,))
    return {r[0]: _counter(r[1]) for r in rows}


# Versions.

def latest_version(conn) -> int | None:
    row = conn.execute("SELECT MAX(version) FROM versions").fetchone()
    return None if row[0] is None else int(row[0])


def add_version(conn, *, version: int, parent_version: int | None, round_id: int | None, num_clients: int = 0,
                total_examples: int = 0, publish_seconds: float | None = None) -> None:
    conn.execute("INSERT INTO versions (version, parent_version, round_id, created_at, num_clients, total_examples,"
                 " publish_seconds) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (version, parent_version, round_id, time.time(), num_clients, total_examples, publish_seconds))


def versions(conn, limit: int = 50) -> list[dict]:
    return [dict(r) for r in conn.execute("SELECT * FROM versions ORDER BY version DESC LIMIT ?", (limit,))]


def set_eval(conn, version: int, eval_json: str) -> bool:
    if not 0 <= version <= INT64_MAX:
        return False
    return conn.execute("UPDATE versions SET eval_json = ? WHERE version = ?", (eval_json, version)).rowcount == 1


def totals(conn) -> dict:
    """Counters since the state directory was created (for /metrics)."""
    accepted, accepted_bytes = conn.execute("SELECT COUNT(*), TOTAL(bytes) FROM updates").fetchone()
    rejected_bytes = conn.execute("SELECT TOTAL(bytes) FROM rejections").fetchone()[0]
    outcomes = {r[0]: r[1] for r in conn.execute("SELECT state, COUNT(*) FROM rounds GROUP BY state")}
    devices = conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
    return {"accepted": int(accepted), "bytes_received": _counter(_counter(accepted_bytes) + _counter(rejected_bytes)),
            "rounds": outcomes, "devices": int(devices)}
