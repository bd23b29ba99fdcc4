"""Crash safety: every accepted update is counted exactly once across kill -9 and restart.

One test kills a real `fedkb serve` process mid-round; the others stop the folder at each crash
window (blob written but not recorded, folded but not checkpointed, checkpointed but blobs not
deleted) and check a fresh folder continues with exactly the accepted updates.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from safetensors.numpy import load_file

from aggregator import db
from aggregator.fedavg import ClippedSum, WeightedSum
from aggregator.folding import Folder, write_blob
from aggregator.rounds import OPEN, round_settings
from aggregator.config import load_config
from fedkb_core.wire import UpdateMetadata, WeightSpec, decode_update, encode_update
from tests.fixtures_aggregator import (ADMIN, TINY_SHAPES, Device, ServeProcess, make_weights_model, random_deltas,
                                       status, wait_for)


def _reference(updates, clip_norm):
    total = ClippedSum(WeightedSum(TINY_SHAPES), clip_norm)
    for deltas, n in updates:
        total.add(deltas, n)
    return total.mean()


def _start_partial_upload(url: str, device: Device, round_id: int, body: bytes) -> socket.socket:
    """Send the headers and half the body of an upload, then stall (the server must not count it)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /v1/rounds/{round_id}/updates HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {device.token}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def test_kill9_mid_round_then_restart_counts_each_accepted_update_once(tmp_path):
    model = make_weights_model(tmp_path / "model", seed=5)
    state = tmp_path / "state"
    folding, accept_only = tmp_path / "folding.json", tmp_path / "accept_only.json"
    # Checkpoint after every fold pass; the second process accepts but never folds, so the kill
    # surely lands with accepted updates that are not in the checkpoint yet.
    folding.write_text(json.dumps({"worker_interval": 0.02, "checkpoint_interval": 0.0}))
    accept_only.write_text(json.dumps({"background_worker": False}))
    args = ("--goal-clients", "6", "--min-clients", "2", "--round-timeout", "120", "--clip-norm", "1.0",
            "--server-optimizer", "sgd")  # plain FedAvg: the new version is w + mean delta
    accepted = {}  # device_id -> (deltas, num_examples) the server answered "accepted" for

    # Process 1: two updates accepted, folded and checkpointed; then kill -9.
    server = ServeProcess(state, model, "--config", str(folding), *args, log=tmp_path / "serve1.log")
    try:
        devices = [Device(server.url) for _ in range(7)]
        for d in devices:
            assert d.enroll().status_code == 201
        tasks = {d.device_id: d.task() for d in devices}
        bodies = {}
        for i, d in enumerate(devices):
            deltas, n = random_deltas(TINY_SHAPES, 100 + i, scale=0.4), 5 + 7 * i
            bodies[d.device_id] = (d.body(tasks[d.device_id], deltas, num_examples=n), deltas, n)

        def upload(d):
            r = d.upload(1, bodies[d.device_id][0])
            assert r.status_code == 200 and not r.json()["duplicate"], r.text
            accepted[d.device_id] = bodies[d.device_id][1:]

        for d in devices[:2]:
            upload(d)
        wait_for(lambda: status(server.url)["round"]["folded"] == 2, what="two updates folded and checkpointed")
        server.kill9()
    finally:
        server.stop()

    # Process 2: two more accepted (durable, not folded), one upload cut off halfway; kill -9.
    server = ServeProcess(state, None, "--config", str(accept_only), *args, log=tmp_path / "serve2.log",
                          port=server.port)
    try:
        for d in devices[2:4]:
            upload(d)
        stalled = _start_partial_upload(server.url, devices[4], 1, bodies[devices[4].device_id][0])
        server.kill9()
        stalled.close()
    finally:
        server.stop()
    assert len(list((state / "inbox" / "1").glob("*.safetensors"))) == 2

    # Process 3: recovers, takes the rest, closes the round and publishes version 2.
    server = ServeProcess(state, None, "--config", str(folding), *args, log=tmp_path / "serve3.log", port=server.port)
    try:
        s = status(server.url)
        assert s["round"]["id"] == 1 and s["round"]["accepted"] == 4 and s["model_version"] == 1
        # A retry of an accepted upload is a duplicate; the half-sent one was never counted.
        again = devices[2].upload(1, bodies[devices[2].device_id][0])
        assert again.status_code == 200 and again.json()["duplicate"]
        for d in devices[4:6]:
            upload(d)
        s = wait_for(lambda: (s := status(server.url))["model_version"] == 2 and s, what="version 2")
        # Round 2 may or may not be open yet: find round 1 by its id, not by its place in the list.
        assert {r["id"]: r["accepted"] for r in s["rounds"]}[1] == 6 and s["versions"][0]["num_clients"] == 6
        late = devices[6].upload(1, bodies[devices[6].device_id][0])
        assert late.status_code == 409 and late.json()["error"] == "round_closed"
    finally:
        server.stop()

    assert len(accepted) == 6
    w1 = load_file(model / "weights.safetensors")
    w2 = load_file(state / "models" / "2" / "weights.safetensors")
    mean = _reference(list(accepted.values()), 1.0)
    for k in TINY_SHAPES:
        np.testing.assert_allclose(w2[k], w1[k] + mean[k], rtol=1e-5, atol=1e-6)
    assert not any((state / "inbox").rglob("*.safetensors")) and not any((state / "sums").glob("*"))


def test_kill9_during_concurrent_uploads_keeps_every_answered_update_exactly_once(tmp_path):
    """Concurrent accepts share commits (`db.GroupCommit`); a kill -9 amid them loses no answered one."""
    model = make_weights_model(tmp_path / "model", seed=7)
    state = tmp_path / "state"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"worker_interval": 0.02, "checkpoint_interval": 0.0}))
    args = ("--config", str(settings), "--goal-clients", "60", "--min-clients", "2", "--round-timeout", "120",
            "--clip-norm", "1.0", "--server-optimizer", "sgd")  # plain FedAvg: the new version is w + mean delta
    server = ServeProcess(state, model, *args, log=tmp_path / "serve1.log")
    answered, lock, killed = set(), threading.Lock(), threading.Event()
    try:
        devices = [Device(server.url) for _ in range(40)]
        for d in devices:
            assert d.enroll().status_code == 201
        tasks = {d.device_id: d.task() for d in devices}
        updates = {d.device_id: (random_deltas(TINY_SHAPES, 300 + i, scale=0.4), 3 + i) for i, d in enumerate(devices)}
        bodies = {d.device_id: d.body(tasks[d.device_id], *updates[d.device_id]) for d in devices}

        def upload(d):
            try:
                r = d.upload(1, bodies[d.device_id])  # each device has its own HTTP session
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                return  # cut off by the kill, before or while the answer came: the device will retry
            if r.status_code == 200:
                with lock:
                    answered.add(d.device_id)
                    if len(answered) >= 12:
                        killed.set()

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(upload, d) for d in devices]
            killed.wait(30)
            server.kill9()
            for f in futures:
                f.result()
    finally:
        server.stop()
    assert len(answered) >= 12

    server = ServeProcess(state, None, *args, log=tmp_path / "serve2.log", port=server.port)
    try:
        conn = db.connect(state)
        committed = {r["device_id"] for r in conn.execute("SELECT device_id FROM updates WHERE round_id = 1")}
        conn.close()
        assert answered <= committed  # every answered update survived the kill
        assert status(server.url)["round"]["accepted"] == len(committed)
        for d in devices:  # the retries: a committed update is a duplicate, the others are accepted now
            r = d.upload(1, bodies[d.device_id])
            assert r.status_code == 200 and r.json()["duplicate"] == (d.device_id in committed), r.text
        assert requests.post(f"{server.url}/v1/admin/rounds/current/end",
                             headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        s = wait_for(lambda: (s := status(server.url))["model_version"] == 2 and s, what="version 2")
        assert s["versions"][0]["num_clients"] == len(devices)
    finally:
        server.stop()
    w1 = load_file(model / "weights.safetensors")
    w2 = load_file(state / "models" / "2" / "weights.safetensors")
    mean = _reference(list(updates.values()), 1.0)  # each device's update exactly once
    for k in TINY_SHAPES:
        np.testing.assert_allclose(w2[k], w1[k] + mean[k], rtol=1e-5, atol=1e-6)


# The crash windows one by one, on the folder itself.

SPECS = [WeightSpec(k, s) for k, s in TINY_SHAPES.items()]


@pytest.fixture
def round_db(tmp_path):
    state = tmp_path / "state"
    db.init_db(state)
    conn = db.connect(state)
    config = load_config(environ={}, overrides={"testing": True, "state_dir": state, "clip_norm": 0.8})
    with db.transaction(conn):
        round_id = db.insert_round(conn, round_settings(config, model_version=1, batch_size=2, now=0.0))
    yield state, conn, db.get_round(conn, round_id)
    conn.close()


def _accept(state, conn, round_, i):
    deltas, n = random_deltas(TINY_SHAPES, i, scale=0.5), 3 + i
    meta = UpdateMetadata(round_id=round_.id, model_version=1, device_id=f"dev{i}", num_examples=n,
                          clip_norm=0.8, update_norm=0.0)
    blob = write_blob(state, round_.id, f"dev{i}", encode_update(deltas, meta))
    with db.transaction(conn):
        db.add_update(conn, round_id=round_.id, device_id=f"dev{i}", num_examples=n, update_norm=1.0, device_norm=0.0,
                      body_sha256=str(i), size=1, blob=str(blob.relative_to(state)))
    return deltas, n


def _assert_sum(folder, round_, updates):
    current = folder.current(round_.id)
    assert current.total.count == len(updates)
    for k, v in _reference(updates, 0.8).items():
        np.testing.assert_allclose(current.total.mean()[k], v, rtol=1e-6, atol=1e-7)


def test_orphan_blob_without_a_row_is_never_folded(round_db):
    state, conn, round_ = round_db
    updates = [_accept(state, conn, round_, i) for i in range(3)]
    meta = UpdateMetadata(round_id=round_.id, model_version=1, device_id="ghost", num_examples=99, clip_norm=0.8,
                          update_norm=0.0)
    write_blob(state, round_.id, "ghost", encode_update(random_deltas(TINY_SHAPES, 50), meta))  # crash before commit
    folder = Folder(state, checkpoint_interval=0.0)
    folder.fold_pending(conn, round_, SPECS)
    _assert_sum(folder, round_, updates)
    folder.discard(round_.id)
    assert not (state / "inbox" / str(round_.id)).exists()


def test_crash_before_checkpoint_refolds_from_the_last_checkpoint(round_db):
    state, conn, round_ = round_db
    updates = [_accept(state, conn, round_, i) for i in range(2)]
    Folder(state, checkpoint_interval=0.0).fold_pending(conn, round_, SPECS)  # checkpointed
    updates += [_accept(state, conn, round_, i) for i in range(2, 5)]
    lost = Folder(state, checkpoint_interval=float("inf"))  # folds in memory, never checkpoints: then "dies"
    assert lost.fold_pending(conn, round_, SPECS) == 3
    assert db.get_round(conn, round_.id).folded == 2  # what survives it is the first checkpoint

    restarted = Folder(state, checkpoint_interval=0.0)
    restarted.fold_pending(conn, round_, SPECS)
    _assert_sum(restarted, round_, updates)


def test_crash_after_checkpoint_before_blob_deletion_does_not_double_count(round_db, tmp_path):
    state, conn, round_ = round_db
    updates = [_accept(state, conn, round_, i) for i in range(4)]
    kept = tmp_path / "kept"
    shutil.copytree(state / "inbox", kept)
    Folder(state, checkpoint_interval=0.0).fold_pending(conn, round_, SPECS)
    assert not any((state / "inbox").rglob("*.safetensors"))
    shutil.rmtree(state / "inbox")
    shutil.copytree(kept, state / "inbox")  # as if the process died right after the checkpoint

    restarted = Folder(state, checkpoint_interval=0.0)
    restarted.fold_pending(conn, round_, SPECS)
    _assert_sum(restarted, round_, updates)
    assert not any((state / "inbox").rglob("*.safetensors"))  # the leftovers were cleaned, not folded
    stored = db.get_round(conn, round_.id)
    assert (stored.state, stored.folded) == (OPEN, len(updates))


def _write_accepted(state, conn, round_, device_id, body, n):
    blob = write_blob(state, round_.id, device_id, body)
    with db.transaction(conn):
        db.add_update(conn, round_id=round_.id, device_id=device_id, num_examples=n, update_norm=1.0, device_norm=0.0,
                      body_sha256=device_id, size=len(body), blob=str(blob.relative_to(state)))


@pytest.mark.parametrize("encoding", ["float16", "hadamard"])
def test_folder_decodes_other_encodings_like_the_device_path(round_db, encoding):
    """Float32 blobs are added as one vector; other encodings go through decode_update: same sum."""
    state, conn, round_ = round_db
    reference = []
    for i in range(3):
        deltas, n = random_deltas(TINY_SHAPES, 70 + i, scale=0.5), 4 + i
        meta = UpdateMetadata(round_id=round_.id, model_version=1, device_id=f"e{i}", num_examples=n, clip_norm=0.8,
                              update_norm=0.0, encoding=encoding if i else "float32",
                              **(dict(update_bits=3, rotation_seed=99) if i and encoding == "hadamard" else {}))
        body = encode_update(deltas, meta)
        _write_accepted(state, conn, round_, f"e{i}", body, n)
        reference.append((decode_update(body, SPECS).deltas, n))
    folder = Folder(state, checkpoint_interval=0.0)
    folder.fold_pending(conn, round_, SPECS)
    _assert_sum(folder, round_, reference)


def test_folder_quarantines_a_blob_that_is_no_longer_finite(round_db):
    """A blob is validated before it is accepted; if it were changed on disk, NaN never enters the
    sum: the blob is set aside, counted as `unfoldable`, and the next one still folds."""
    state, conn, round_ = round_db
    deltas = random_deltas(TINY_SHAPES, 90)
    deltas["dense/bias"][3] = np.nan
    meta = UpdateMetadata(round_id=round_.id, model_version=1, device_id="nan", num_examples=5, clip_norm=0.8,
                          update_norm=0.0)
    body = encode_update(deltas, meta)
    _write_accepted(state, conn, round_, "nan", body, 5)
    good = random_deltas(TINY_SHAPES, 91)
    _write_accepted(state, conn, round_, "good", encode_update(good, dataclasses.replace(meta, device_id="good")), 5)
    folder = Folder(state, checkpoint_interval=0.0)
    assert folder.fold_pending(conn, round_, SPECS) == 1
    assert folder.current(round_.id).total.count == 1 and np.all(np.isfinite(folder.current(round_.id).total.flat))
    assert db.rejections(conn, round_.id) == {"unfoldable": 1}
    assert [r["device_id"] for r in conn.execute("SELECT device_id FROM updates")] == ["good"]
    (kept,) = (state / "quarantine" / str(round_.id)).iterdir()
    assert kept.read_bytes() == body


def test_write_blob_leaves_one_complete_file_and_nothing_else(tmp_path):
    body = bytes(range(256)) * 1000
    path = write_blob(tmp_path, 3, "dev", body)
    assert path.read_bytes() == body and list(path.parent.iterdir()) == [path]
    other = write_blob(tmp_path, 3, "dev", body, sync_dir=False)  # same device: a second, distinct name
    assert other != path and sorted(path.parent.iterdir()) == sorted([path, other])
