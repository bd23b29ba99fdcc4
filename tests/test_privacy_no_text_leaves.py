"""Nothing typed leaves the phone: every byte a real device sends is scanned for its text.

A real `fedkb device` process enrolls with a real `fedkb serve`, fetches the model, checks in,
trains on the user's messages with LiteRT and uploads its update, all through a TCP relay on
loopback (`RecordingProxy`) that keeps every byte the device sends. The scanner then looks in
those bytes for each typed word (≥ 4 letters; shorter ones are covered by the phrases), each
pair of adjacent words, each run of three SentencePiece pieces, and each run of three
consecutive token ids of the device's example store, as int32, int64 and float32 little-endian
bytes and as decimal text. The controls plant each form into one request through the same relay
and show the scanner finds it: a scanner that never fires proves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from datasets.tokenizer import encode_utterances, load_tokenizer
from edge_runtime.store import ExampleStore
from fedkb_core.manifest import TOKENIZER_FILE
from tests.fixtures_aggregator import REPO, SECRET, ServeProcess
from tests.fixtures_edge import PRIVATE_MESSAGES, RecordingProxy, shakespeare_edge_model  # noqa: F401

ALL_MET = "charging=1,idle=1,unmetered=1,battery=90"
RUN = 3  # consecutive token ids


@dataclasses.dataclass(frozen=True)
class Needle:
    """One form of the user's text that must not appear on the wire."""

    kind: str  # word | phrase | pieces | int32 | int64 | float32 | decimal
    what: str
    pattern: re.Pattern[bytes]


def text_needles(messages: list[str], tokenizer) -> list[Needle]:
    found = {}
    for message in messages:
        words = message.split()
        for w in words:
            if len(w) >= 4 and w.isalpha():
                found[("word", w)] = re.escape(w.encode())
        for a, b in zip(words, words[1:]):
            found[("phrase", f"{a} {b}")] = re.escape(f"{a} {b}".encode())
        pieces = tokenizer.encode(message, out_type=str)
        for i in range(len(pieces) - RUN + 1):
            run = "".join(pieces[i:i + RUN])
            found[("pieces", run)] = re.escape(run.encode())
    return [Needle(kind, what, re.compile(p)) for (kind, what), p in found.items()]


def id_needles(stream: np.ndarray) -> list[Needle]:
    """Every run of RUN consecutive ids in the store's token stream, in each encoding."""
    runs = {tuple(int(t) for t in stream[i:i + RUN]) for i in range(len(stream) - RUN + 1)}
    needles = []
    for run in sorted(runs):
        for kind, dtype in (("int32", "<i4"), ("int64", "<i8"), ("float32", "<f4")):
            needles.append(Needle(kind, str(run), re.compile(re.escape(np.asarray(run, dtype).tobytes()))))
        decimal = rb"[,;\s]+".join(str(t).encode() for t in run)
        needles.append(Needle("decimal", str(run), re.compile(rb"(?<![0-9.])" + decimal + rb"(?![0-9])")))
    return needles


def leaks(streams: list[bytes], needles: list[Needle]) -> list[Needle]:
    """The needles found in any of the byte streams."""
    return [n for n in needles if any(n.pattern.search(s) for s in streams)]


def fedkb_device(url: str, home: Path, text: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDKB_")}
    env["FEDKB_ENROLLMENT_SECRET"] = SECRET
    out = subprocess.run([sys.executable, "-m", "fedkb", "device", "--server", url, "--home", str(home), "--text",
                          str(text), "--state", ALL_MET, "--once", "--format", "json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    (report,) = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return report


@dataclasses.dataclass
class Session:
    server: ServeProcess
    report: dict
    sent: list[bytes]
    requests: list
    needles: list[Needle]
    messages: list[str]
    stream: np.ndarray
    tokenizer: object


@pytest.fixture(scope="module")
def session(shakespeare_edge_model, tmp_path_factory):
    """One real device's whole first cycle, recorded: enrollment, key pinning, model download,
    check-in, LiteRT training, upload."""
    root = tmp_path_factory.mktemp("no_text_leaves")
    server = ServeProcess(root / "state", shakespeare_edge_model, "--min-clients", "1", "--goal-clients", "1",
                          "--round-timeout", "600", log=root / "serve.log")
    recorder = RecordingProxy(server.url)
    try:
        text = root / "typed.txt"
        text.write_text("\n".join(PRIVATE_MESSAGES) + "\n")
        home = root / "phone"
        report = fedkb_device(recorder.url, home, text)
        with ExampleStore(home / "examples.sqlite") as store:
            messages = store.texts()
        tokenizer = load_tokenizer(shakespeare_edge_model / TOKENIZER_FILE)
        stream = encode_utterances(tokenizer, messages)  # the store's token stream, as the device trains on it
        yield Session(server, report, recorder.sent(), recorder.requests(),
                      text_needles(messages, tokenizer) + id_needles(stream), messages, stream, tokenizer)
    finally:
        recorder.stop()
        server.stop()


def test_the_recording_holds_the_whole_cycle(session):
    assert session.report["action"] == "accepted", session.report
    assert sorted(session.messages) == sorted(PRIVATE_MESSAGES)  # the store holds what was typed
    seen = [(r.method, r.path) for r in session.requests]
    for expected in [("POST", "/v1/devices"), ("GET", "/v1/models/signing-key"), ("POST", "/v1/checkin"),
                     ("POST", "/v1/rounds/1/updates")]:
        assert expected in seen, seen
    assert any(m == "GET" and p.endswith("/trainable.tflite") for m, p in seen), seen
    (upload,) = [r for r in session.requests if r.path.endswith("/updates")]
    assert len(upload.body) == session.report["upload_bytes"]  # the relay kept the whole body
    # Every byte is accounted for: the parsed requests are the recorded streams, nothing left over.
    assert sum(len(r.head) + len(r.body) for r in session.requests) == sum(len(s) for s in session.sent)


def test_no_typed_text_or_token_run_leaves_the_device(session):
    kinds = {n.kind for n in session.needles}
    assert kinds == {"word", "phrase", "pieces", "int32", "int64", "float32", "decimal"}
    found = leaks(session.sent, session.needles)
    assert found == [], [(n.kind, n.what) for n in found[:20]]


def _plant(session, body: bytes, content_type: str) -> list[bytes]:
    """One more request through a fresh relay in front of the same server, carrying `body`."""
    recorder = RecordingProxy(session.server.url)
    try:
        requests.post(f"{recorder.url}/v1/checkin", data=body, headers={"Content-Type": content_type}, timeout=10)
        return recorder.sent()
    finally:
        recorder.stop()


def _noise(n: int) -> bytes:
    return np.random.default_rng(0).normal(scale=1e-3, size=n).astype("<f4").tobytes()


@pytest.mark.parametrize("kind", ["word", "phrase", "pieces", "int32", "int64", "float32", "decimal"])
def test_the_scanner_finds_each_form_of_a_planted_leak(session, kind):
    """Control: the same relay and scanner, one request that does carry the text in this form."""
    run = session.stream[5:9]
    if kind == "word":
        sent = _plant(session, json.dumps({"draft": "the wifi password is marmalade"}).encode(), "application/json")
    elif kind == "phrase":  # no word of four letters in it: only the phrases give it away
        sent = _plant(session, json.dumps({"draft": "my pin is 4197"}).encode(), "application/json")
    elif kind == "pieces":
        sent = _plant(session, "".join(session.tokenizer.encode("my pin is 4197", out_type=str)).encode(),
                      "text/plain; charset=utf-8")
    elif kind == "decimal":
        sent = _plant(session, json.dumps({"recent_tokens": run.tolist()}).encode(), "application/json")
    else:
        dtype = {"int32": "<i4", "int64": "<i8", "float32": "<f4"}[kind]
        sent = _plant(session, _noise(64) + run.astype(dtype).tobytes() + _noise(64), "application/octet-stream")
    found = {(n.kind, n.what) for n in leaks(sent, session.needles)}
    assert kind in {k for k, _ in found}, f"the scanner missed a planted {kind} leak"
    if kind in ("int32", "int64", "float32", "decimal"):
        assert (kind, str(tuple(run[:RUN].tolist()))) in found
