"""Attack: enrolled devices take every task slot and never upload (issue 13, item 7).

Before, they held the slots until the deadline: honest devices got `round_full` and rounds were
abandoned one after another. Against a real `fedkb serve` over HTTP: every task carries a
`report_by` time; once it passes without an upload, the next device that finds the round full
gets the slot, the silent device gets no second task in that round (`task_expired`) and its late
upload is refused, and the round completes with the honest devices.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from aggregator import db
from aggregator.rounds import CLOSING, OPEN, RoundRecord, checkin_decision, report_by, state_after_quarantine
from fedkb_core.protocol import RoundTask
from tests.fixtures_aggregator import TINY_SHAPES, Device, ServeProcess, make_weights_model, random_deltas, status, wait_for

WINDOW = 2.0


def _enrolled(url: str, n: int) -> list[Device]:
    devices = [Device(url) for _ in range(n)]
    for d in devices:
        assert d.enroll().status_code == 201
    return devices


def test_silent_devices_lose_their_slots_after_the_report_window_and_the_round_completes(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"report_window": WINDOW}))
    server = ServeProcess(tmp_path / "state", make_weights_model(tmp_path / "model"), "--config", str(config),
                          "--goal-clients", "2", "--min-clients", "2", "--over-selection", "1.0",
                          "--round-timeout", "60", log=tmp_path / "serve.log")
    try:
        hostages, honest = _enrolled(server.url, 2), _enrolled(server.url, 2)
        held = [d.task() for d in hostages]  # every slot of round 1, and then silence
        assert all(t.report_by is not None and t.report_by <= t.deadline for t in held)
        assert all(abs(t.report_by - (time.time() + WINDOW)) < WINDOW for t in held)
        r = honest[0].checkin()
        assert r.json()["action"] == "wait" and r.json()["reason"] == "round_full", r.text

        def gets_task():
            r = honest[0].checkin()
            return r.json()["action"] == "train" and r.json()
        answer = wait_for(gets_task, timeout=WINDOW + 15, interval=0.2, what="a slot after the report window")
        assert time.time() >= max(t.report_by for t in held)  # not before the silent devices' time was up
        task = RoundTask.from_json(answer["task"])
        assert task.round_id == 1 and task.report_by > max(t.report_by for t in held)

        # The silent devices: no second task in this round, and a late upload is refused.
        r = hostages[0].checkin()
        assert (r.json()["action"], r.json()["reason"]) == ("wait", "task_expired"), r.text
        late = hostages[1].upload(1, hostages[1].body(held[1], random_deltas(TINY_SHAPES, 9)))
        assert (late.status_code, late.json()["error"]) == (409, "task_expired"), late.text

        # The honest devices complete the round: version 2 is published from their updates.
        second = honest[1].task()
        for d, t, seed in ((honest[0], task, 1), (honest[1], second, 2)):
            r = d.upload(t.round_id, d.body(t, random_deltas(TINY_SHAPES, seed)))
            assert r.status_code == 200, r.text
        s = wait_for(lambda: (s := status(server.url))["model_version"] == 2 and s, timeout=30, what="version 2")
        first = next(r for r in s["rounds"] if r["id"] == 1)
        assert first["state"] == "closed" and first["accepted"] == 2 and s["versions"][0]["num_clients"] == 2
        assert s["rejected_total"] == {"task_expired": 1}
    finally:
        server.stop()


def test_one_device_holds_at_most_one_slot_however_often_it_checks_in(tmp_path):
    server = ServeProcess(tmp_path / "state", make_weights_model(tmp_path / "model"), "--goal-clients", "2",
                          "--over-selection", "1.5", log=tmp_path / "serve.log")
    try:
        greedy, other = _enrolled(server.url, 2)
        with ThreadPoolExecutor(8) as pool:
            state = {"idle": True, "charging": True, "unmetered": True, "battery": 90.0}
            answers = list(pool.map(lambda _: requests.post(f"{server.url}/v1/checkin", headers=greedy.headers,
                                                            json={"model_version": None, "state": state}), range(24)))
        assert all(r.status_code == 200 and r.json()["action"] == "train" for r in answers)
        assert len({r.json()["task"]["report_by"] for r in answers}) == 1  # one task, told the same time each time
        assert status(server.url)["round"]["assigned"] == 1
        other.task()
        assert status(server.url)["round"]["assigned"] == 2
    finally:
        server.stop()


ROUND = RoundRecord(id=1, model_version=1, state=OPEN, opened_at=0.0, deadline=100.0, min_clients=2, goal_clients=3,
                    max_assigned=4, clip_norm=1.0, learning_rate=0.5, epochs=1, batch_size=2, max_examples=10,
                    encoding="float32", assigned=4, accepted=3)


def test_report_by_never_passes_the_deadline():
    assert report_by(ROUND, now=10.0, window=30.0) == 40.0 and report_by(ROUND, now=90.0, window=30.0) == 100.0


def test_a_reclaimed_task_is_not_given_again_and_a_submitted_one_is_not_expired():
    free = dataclasses.replace(ROUND, assigned=0)
    assert checkin_decision(free, has_task=False, has_submitted=False, task_reclaimed=True, now=1.0) == "task_expired"
    assert checkin_decision(free, has_task=True, has_submitted=True, now=1.0) == "already_submitted"
    assert checkin_decision(free, has_task=False, has_submitted=False, now=1.0) == "assign"


def test_a_quarantined_update_reopens_a_round_only_if_it_lacks_its_goal_without_it():
    assert state_after_quarantine(dataclasses.replace(ROUND, state=CLOSING)) == OPEN
    assert state_after_quarantine(dataclasses.replace(ROUND, state=CLOSING, accepted=4)) == CLOSING
    assert state_after_quarantine(ROUND) == OPEN


def test_a_state_folder_from_before_report_windows_gains_the_task_columns(tmp_path):
    conn = sqlite3.connect(tmp_path / db.DB_FILE)
    conn.execute("CREATE TABLE tasks (round_id INTEGER NOT NULL, device_id TEXT NOT NULL, assigned_at REAL NOT NULL,"
                 " PRIMARY KEY (round_id, device_id))")
    conn.execute("INSERT INTO tasks VALUES (1, 'old', 5.0)")
    conn.commit()
    conn.close()
    db.init_db(tmp_path)
    db.init_db(tmp_path)  # idempotent
    conn = db.connect(tmp_path)
    try:
        assert db.has_task(conn, 1, "old") and db.task_of(conn, 1, "old")["report_by"] is None
        assert not db.has_overdue_tasks(conn, 1, now=1e12)  # a task without a report-by time is never reclaimed
    finally:
        conn.close()
