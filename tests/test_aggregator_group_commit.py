"""`db.GroupCommit`: concurrent writes share one commit, each gets its own outcome, and none is
reported before the commit that holds it."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from aggregator import db
from tests.fixtures_aggregator import wait_for


@pytest.fixture
def state(tmp_path):
    db.init_db(tmp_path)
    return tmp_path


def _add_device(device_id):
    def write(conn):
        db.add_device(conn, device_id, "hash", "test")
        return device_id

    return write


def _device_ids(state) -> set[str]:
    conn = db.connect(state)
    try:
        return {r["id"] for r in conn.execute("SELECT id FROM devices")}
    finally:
        conn.close()


def test_waiting_writes_share_one_commit_and_each_gets_its_own_result(state):
    commits = db.GroupCommit(state)
    leading, release, results = threading.Event(), threading.Event(), {}

    def first(conn):  # holds the leader's batch open while the others queue up
        leading.set()
        release.wait(10)
        return _add_device("first")(conn)

    def run(name, fn):
        results[name] = commits.run(fn)

    threads = [threading.Thread(target=run, args=("first", first))]
    threads[0].start()
    assert leading.wait(10), "the first write never ran"
    threads += [threading.Thread(target=run, args=(f"d{i}", _add_device(f"d{i}"))) for i in range(8)]
    for t in threads[1:]:
        t.start()
    wait_for(lambda: commits.pending() == 8, what="eight writes queued behind the leader")
    release.set()
    for t in threads:
        t.join(10)

    assert results == {"first": "first", **{f"d{i}": f"d{i}" for i in range(8)}}
    assert (commits.batches, commits.writes) == (2, 9)  # the eight queued writes went in one commit
    assert _device_ids(state) == set(results)
    commits.close()


def test_a_failing_write_is_undone_alone_and_raises_in_its_own_caller(state):
    commits = db.GroupCommit(state)
    leading, release, outcomes = threading.Event(), threading.Event(), {}

    def first(conn):
        leading.set()
        release.wait(10)
        return _add_device("first")(conn)

    def failing(conn):
        db.add_device(conn, "half-written", "hash", "test")  # rolled back with its savepoint
        raise LookupError("this write fails")

    def run(name, fn):
        try:
            outcomes[name] = commits.run(fn)
        except LookupError as err:
            outcomes[name] = err

    threads = [threading.Thread(target=run, args=("first", first))]
    threads[0].start()
    assert leading.wait(10), "the first write never ran"
    for name, fn in (("a", _add_device("a")), ("bad", failing), ("b", _add_device("b"))):
        threads.append(threading.Thread(target=run, args=(name, fn)))
        threads[-1].start()
        wait_for(lambda n=len(threads) - 1: commits.pending() == n, what=f"{name} queued")
    release.set()
    for t in threads:
        t.join(10)

    assert isinstance(outcomes.pop("bad"), LookupError)
    assert outcomes == {"first": "first", "a": "a", "b": "b"}
    assert _device_ids(state) == {"first", "a", "b"}
    commits.close()


def test_when_the_shared_transaction_fails_every_caller_gets_the_error_and_nothing_is_written(state):
    commits = db.GroupCommit(state, busy_timeout=0.05)
    blocker = db.connect(state)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: BEGIN IMMEDIATE times out
    try:
        with pytest.raises(sqlite3.OperationalError):
            commits.run(_add_device("lost"))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _device_ids(state) == set()
    assert commits.run(_add_device("later")) == "later"  # a fresh connection, and on it goes
    assert _device_ids(state) == {"later"}
    commits.close()


def test_a_result_is_returned_only_once_it_is_committed(state):
    commits = db.GroupCommit(state)
    seen_by_another_connection = []

    def write(conn):
        db.add_device(conn, "x", "hash", "test")
        seen_by_another_connection.append("x" in _device_ids(state))  # not yet: still uncommitted
        return "x"

    assert commits.run(write) == "x"
    assert seen_by_another_connection == [False] and _device_ids(state) == {"x"}
    commits.close()
