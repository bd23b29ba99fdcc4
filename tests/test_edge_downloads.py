"""What a model version costs a device to download, counted on the wire, and hostile 304s.

A real server (gunicorn and `--dev` Werkzeug for the HTTP semantics, the in-process Werkzeug
server for the device's downloads) behind a `RecordingProxy` that keeps every request and the
server's answer, so what a device fetched is counted where it passed, not taken from the device.
The device is the edge runtime's own `ModelStore` and `ServerClient`.
"""

from __future__ import annotations

import hashlib

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.client import RetryPolicy, ServerClient
from edge_runtime.model_store import ModelRejected, ModelStore
from edge_runtime.version_check import SUGGESTION_FILES, TRAINING_FILES
from fedkb_core.durable import leftover_temps
from fedkb_core.manifest import (INFERENCE_FILE, MANIFEST_FILE, TOKENIZER_FILE, TRAINABLE_FILE, load_manifest,
                                 sha256_file, verify_files)
from fedkb_core.signing import SIGNATURE_FILE, ManifestSigner, TrustedKeys
from tests.fixtures_aggregator import ServeProcess, ServerThread, server_overrides
from tests.fixtures_edge import FaultProxy, RecordingProxy, edge_model, retrained  # noqa: F401
from tests.fixtures_hostile import HostileServer, Reply, Step, wait


@pytest.fixture(scope="module")
def server(retrained, tmp_path_factory):
    """A real server whose current version is the retrained version 2."""
    srv = ServerThread(server_overrides(tmp_path_factory.mktemp("downloads_server") / "state", retrained,
                                        min_clients=1, goal_clients=5))
    yield srv
    srv.stop()


@pytest.fixture
def wire(server):
    proxy = RecordingProxy(server.url)
    yield proxy
    proxy.stop()


def _client(url: str) -> ServerClient:
    return ServerClient(url, retry=RetryPolicy(max_attempts=2, base_delay=0.0, max_delay=0.0), sleep=lambda s: None)


def _store(root, edge_model, server) -> ModelStore:
    """A device holding version 1 whole, trusting the server's signing key."""
    store = ModelStore(root)
    store.install_local(edge_model)
    store.trusted_keys = TrustedKeys.from_pem(server.state.store.signer.public_pem(), where="test")
    return store


def _fetched(proxy: RecordingProxy, since: int = 0) -> list[tuple[str, int, int]]:
    """(path, status, body bytes) of every answer the proxy carried after the first `since`."""
    return [(e.request.path, e.status, len(e.body)) for e in proxy.exchanges()[since:]]


def test_a_version_costs_the_files_the_work_needs_that_the_device_does_not_hold(edge_model, server, wire, tmp_path):
    store, client = _store(tmp_path / "models", edge_model, server), _client(wire.url)
    served = server.state.store.manifest(2).files
    assert served[TOKENIZER_FILE] == load_manifest(store.root / "v1").files[TOKENIZER_FILE]  # unchanged by training
    assert served[TRAINABLE_FILE] != load_manifest(store.root / "v1").files[TRAINABLE_FILE]

    # To train: the manifest, its signature and the trainable model. The tokenizer is linked from
    # version 1 (hashed again), the inference model not fetched at all.
    store.fetch(client, 2, files=TRAINING_FILES)
    assert [(p, s) for p, s, _ in _fetched(wire)] == [("/v1/models/2/manifest.json", 200),
                                                       ("/v1/models/2/manifest.sig", 200),
                                                       ("/v1/models/2/trainable.tflite", 200)]
    assert sum(n for *_, n in _fetched(wire)) == client.traffic.bytes_received
    assert _fetched(wire)[2][2] == served[TRAINABLE_FILE].bytes
    v2 = store.root / "v2"
    assert not (v2 / INFERENCE_FILE).exists() and store.holds(2, TRAINING_FILES) and not store.holds(2)
    verify_files(v2, load_manifest(v2), TRAINING_FILES)
    assert (v2 / TOKENIZER_FILE).stat().st_ino == (store.root / "v1" / TOKENIZER_FILE).stat().st_ino

    # Held with those files: not a single request, and the same version again.
    before = len(wire.exchanges())
    assert store.fetch(client, 2, files=TRAINING_FILES).version == 2 and _fetched(wire, before) == []

    # To suggest as well: the manifest it holds is asked for conditionally (304, no body), then only
    # the inference model comes, linked into the version beside what it held.
    store.fetch(client, 2, files=SUGGESTION_FILES)
    assert _fetched(wire, before) == [("/v1/models/2/manifest.json", 304, 0),
                                      ("/v1/models/2/inference.tflite", 200, served[INFERENCE_FILE].bytes)]
    assert store.holds(2) and (store.current_version, store.previous_version) == (2, 1)
    verify_files(v2, load_manifest(v2))
    assert leftover_temps(store.root) == [] and leftover_temps(v2) == []

    # Every later check-in: one conditional request for the latest manifest, answered 304.
    before, received = len(wire.exchanges()), client.traffic.bytes_received
    assert store.update_if_newer(client, SUGGESTION_FILES) is None
    (asked,) = wire.exchanges()[before:]
    assert (asked.request.path, asked.status, asked.body) == ("/v1/models/latest", 304, b"")
    assert f'if-none-match: "{sha256_file(v2 / MANIFEST_FILE)}"'.encode() in asked.request.head.lower()
    assert client.traffic.bytes_received == received


def test_a_device_that_only_trains_fetches_no_inference_model_and_nothing_at_check_in(edge_model, server, tmp_path):
    """The edge runtime's `Device` with suggestions off, through a full cycle against a real round."""
    from edge_runtime.device import Device, DeviceConfig
    from edge_runtime.device_state import ScriptedDeviceState
    from fedkb_core.protocol import DeviceState
    from tests.fixtures_aggregator import SECRET
    from tests.fixtures_edge import ALL_MET

    proxy = RecordingProxy(server.url)
    device = Device(DeviceConfig(server_url=proxy.url, home=tmp_path / "phone", suggestions=False),
                    state=ScriptedDeviceState(DeviceState(**ALL_MET)), client=_client(proxy.url))
    try:
        device.ensure_enrolled(SECRET)
        device.examples.import_lines(["to be or not to be that is the question"] * 30, source="test")
        task = device.request_task()
        checkin = [e.request.path for e in proxy.exchanges()]
        report = device.run_task(task)
        paths = [e.request.path for e in proxy.exchanges()]
    finally:
        device.close()
        proxy.stop()
    assert checkin == ["/v1/devices", "/v1/models/signing-key", "/v1/checkin"]  # no model before a task
    assert report.action == "accepted", report
    assert paths[3:] == ["/v1/models/2/manifest.json", "/v1/models/2/manifest.sig", "/v1/models/2/trainable.tflite",
                         "/v1/models/2/tokenizer.model", f"/v1/rounds/{task.round_id}/updates"]
    assert not (tmp_path / "phone" / "models" / "v2" / INFERENCE_FILE).exists()


def test_a_transfer_that_breaks_off_resumes_where_it_stopped(edge_model, server, tmp_path):
    path, size = f"/v1/models/2/{TRAINABLE_FILE}", server.state.store.manifest(2).files[TRAINABLE_FILE].bytes
    cut = size * 3 // 4
    assert cut > 1 << 16  # past the client's first 64 KiB read, which it keeps
    proxy = FaultProxy(server.url)
    try:
        proxy.cut = {TRAINABLE_FILE: cut}
        store, client = _store(tmp_path / "models", edge_model, server), _client(proxy.url)
        store.fetch(client, 2, files=TRAINING_FILES)
    finally:
        proxy.stop()
    ranges = [g for r, g in zip(proxy.requests, proxy.ranges, strict=True) if r == f"GET {path}"]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1].endswith("-")
    resumed = int(ranges[1][len("bytes="):-1])  # what the client had kept (whole reads)
    assert 0 < resumed <= cut
    assert proxy.delivered[path] == cut + size - resumed < 2 * size  # only the rest came again
    verify_files(store.root / "v2", load_manifest(store.root / "v2"), TRAINING_FILES)
    assert client.retries == 1


@pytest.mark.parametrize("dev", [False, True], ids=["gunicorn", "werkzeug"])
def test_the_model_routes_answer_if_none_match_with_an_empty_304(edge_model, tmp_path, dev):
    serve = ServeProcess(tmp_path / "state", edge_model, *(["--dev"] if dev else []), log=tmp_path / "serve.log")
    try:
        for path in ("latest", "1/manifest.json", "1/manifest.sig", f"1/{TRAINABLE_FILE}", f"1/{TOKENIZER_FILE}"):
            url = f"{serve.url}/v1/models/{path}"
            whole = requests.get(url, timeout=10)
            etag = whole.headers["ETag"]
            assert whole.status_code == 200 and etag == f'"{hashlib.sha256(whole.content).hexdigest()}"'
            with requests.get(url, headers={"If-None-Match": etag}, timeout=10, stream=True) as cached:
                raw = cached.raw.read()
                assert (cached.status_code, raw, cached.headers["ETag"]) == (304, b"", etag), path
                assert cached.headers.get("Content-Length") in (None, "0", str(len(whole.content))), path
                assert "Transfer-Encoding" not in cached.headers, path
            other = requests.get(url, headers={"If-None-Match": '"' + "0" * 64 + '"'}, timeout=10)
            assert other.status_code == 200 and other.content == whole.content, path
    finally:
        serve.stop()


@pytest.fixture
def hostile(edge_model, retrained):
    """A scripted server holding versions 1 and 2 (2 is the retrained one), signing them."""
    server = HostileServer({1: edge_model, 2: retrained}, ManifestSigner(Ed25519PrivateKey.generate()),
                           [Step(1, wait())])
    yield server
    server.stop()


def _hostile_store(root, edge_model, hostile) -> ModelStore:
    store = ModelStore(root)
    store.install_local(edge_model)
    store.trusted_keys = TrustedKeys.from_pem(hostile.signer.public_pem(), where="test")
    (store.root / "v1" / SIGNATURE_FILE).write_bytes(hostile.signer.sign((edge_model / MANIFEST_FILE).read_bytes())
                                                     .to_bytes())
    return store


def _unchanged(store: ModelStore, hashes: dict) -> None:
    assert (store.current_version, store.previous_version) == (1, None)
    assert {p.name: sha256_file(p) for p in (store.root / "v1").iterdir()} == hashes
    assert sorted(p.name for p in store.root.glob("v*")) == ["v1"] and leftover_temps(store.root) == []


@pytest.mark.parametrize("case", ["file_not_asked", "latest_not_held", "wrong_etag", "body", "chunked",
                                  "range_elsewhere"])
def test_a_hostile_304_is_a_clear_rejection_and_loses_nothing(edge_model, hostile, tmp_path, case):
    store = _hostile_store(tmp_path / "models", edge_model, hostile)
    hashes = {p.name: sha256_file(p) for p in (store.root / "v1").iterdir()}
    held = (store.root / "v1" / MANIFEST_FILE).read_bytes()
    etag = f'"{sha256_file(store.root / "v1" / MANIFEST_FILE)}"'
    client = _client(hostile.url)
    if case == "file_not_asked":  # a 304 for a file the device never had, asked unconditionally
        hostile.overrides[f"GET /v1/models/2/{TRAINABLE_FILE}"] = Reply(304, headers=(("ETag", '"' + "1" * 64 + '"'),))
        call, match = (lambda: store.fetch(client, 2, files=TRAINING_FILES)), "holds no copy and did not ask"
    elif case == "latest_not_held":  # a device holding nothing asks unconditionally
        hostile.overrides["GET /v1/models/latest"] = Reply(304)
        store = ModelStore(tmp_path / "empty", trusted_keys=store.trusted_keys)
        call, match = (lambda: store.update_if_newer(client)), "holds no copy and did not ask"
    elif case == "range_elsewhere":  # a part of a file, from another offset than asked (0: no Range sent)
        hostile.overrides[f"GET /v1/models/2/{TRAINABLE_FILE}"] = Reply(206, b"x" * 10, headers=(
            ("Content-Range", "bytes 5-14/100"),))
        call, match = (lambda: store.fetch(client, 2, files=TRAINING_FILES)), "asked for the bytes from 0"
    elif case == "wrong_etag":
        hostile.overrides["GET /v1/models/latest"] = Reply(304, headers=(("ETag", '"' + "2" * 64 + '"'),))
        call, match = (lambda: store.update_if_newer(client)), "for ETag"
    elif case == "body":  # a body where none may be: 304 declaring 5 bytes, not the manifest's size
        hostile.overrides["GET /v1/models/latest"] = Reply(304, b"HELLO", headers=(("ETag", etag),))
        call, match = (lambda: store.update_if_newer(client)), "with a body \\(Content-Length 5"
    else:
        hostile.overrides["GET /v1/models/latest"] = Reply(304, headers=(("ETag", etag), ("Transfer-Encoding", "chunked")))
        call, match = (lambda: store.update_if_newer(client)), "with a body \\(chunked"
    with pytest.raises(ModelRejected, match=match):
        call()
    if case == "latest_not_held":
        assert store.current_version is None and list(store.root.iterdir()) == []
        return
    _unchanged(store, hashes)
    assert (store.root / "v1" / MANIFEST_FILE).read_bytes() == held

    # The next answer on a fresh connection is an honest one: version 2 installs.
    hostile.overrides.clear()
    hostile.script = [Step(2, wait())]
    assert store.update_if_newer(client).version == 2 and store.current_version == 2


def test_a_304_whose_etag_matches_is_the_held_manifest_with_its_signature_checked_again(edge_model, hostile,
                                                                                        tmp_path):
    store = _hostile_store(tmp_path / "models", edge_model, hostile)
    etag = f'"{sha256_file(store.root / "v1" / MANIFEST_FILE)}"'
    # A 304 with the manifest's own length (RFC 9110 allows it) and bytes after it, on a keep-alive
    # connection: the device uses what it holds, and never reads those bytes as the next answer.
    size = (store.root / "v1" / MANIFEST_FILE).stat().st_size
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    hostile.overrides["GET /v1/models/1/manifest.json"] = Reply(
        304, smuggled + b" " * (size - len(smuggled)), headers=(("ETag", etag), ("Content-Length", str(size))))
    (store.root / "v1" / INFERENCE_FILE).unlink()  # held without its inference model: it must fetch that
    client = _client(hostile.url)
    assert store.fetch(client, 1).version == 1 and store.holds(1)
    assert hostile.requested("GET /v1/models/1/") == ["GET /v1/models/1/manifest.json",
                                                      f"GET /v1/models/1/{INFERENCE_FILE}"]

    # A held signature that no longer verifies (the key was rotated out of the app) is refused,
    # even behind a 304 that matches.
    store.trusted_keys = TrustedKeys.from_pem(ManifestSigner(Ed25519PrivateKey.generate()).public_pem(),
                                              where="rotated")
    (store.root / "v1" / INFERENCE_FILE).unlink()
    hostile.overrides["GET /v1/models/1/manifest.json"] = Reply(304, headers=(("ETag", etag),))
    with pytest.raises(ModelRejected, match="key"):
        store.fetch(client, 1)
    assert not (store.root / "v1" / INFERENCE_FILE).exists()
