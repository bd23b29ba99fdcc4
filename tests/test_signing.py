"""Signed model versions: the server signs every manifest, a real device refuses anything else.

The core (`fedkb_core.signing`) is tested with real Ed25519 keys; then a real `fedkb serve`
publishes versions that a real `fedkb device` verifies, and a tampered manifest (through the
`FaultProxy`), a wrong key, a missing signature and a server whose key changed after enrollment
(`HostileServer`) are each refused while the old version keeps serving.
"""

from __future__ import annotations

import json
import multiprocessing
import stat

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedkb_core.manifest import load_manifest
from fedkb_core.signing import (PUBLIC_KEY_FILE, SIGNATURE_FILE, SIGNING_KEY_FILE, ManifestSigner, SignatureError,
                                TrustedKeys, load_or_create_signing_key, public_key_pem)
from tests.fixtures_aggregator import ServeProcess, status, wait_for
from tests.fixtures_edge import FaultProxy, bump_version, edge_model, text_file, user_lines  # noqa: F401
from tests.fixtures_hostile import HostileServer, Step, run_device, task, wait

ALL_MET = "charging=1,idle=1,unmetered=1,battery=90"
MANIFEST = b'{"version": 7, "files": {}}'


def _signer() -> ManifestSigner:
    return ManifestSigner(Ed25519PrivateKey.generate())


# The core ---------------------------------------------------------------------------------

def test_a_signature_verifies_only_the_exact_bytes_under_a_trusted_key():
    signer, other = _signer(), _signer()
    trusted = TrustedKeys.from_pem(signer.public_pem())
    sig = signer.sign(MANIFEST).to_bytes()
    assert trusted.verify(MANIFEST, sig) == signer.key_id
    with pytest.raises(SignatureError, match="does not match the manifest"):
        trusted.verify(MANIFEST.replace(b"7", b"8"), sig)
    with pytest.raises(SignatureError, match="which this device does not trust"):
        trusted.verify(MANIFEST, other.sign(MANIFEST).to_bytes())
    with pytest.raises(SignatureError, match="unsigned"):
        trusted.verify(MANIFEST, None)
    for garbage in (b"", b"{}", b"[" * 900, b'{"algorithm": "rsa", "key_id": "x", "signature": ""}', b"x" * 5000):
        with pytest.raises(SignatureError, match="signature"):
            trusted.verify(MANIFEST, garbage)


def test_a_device_trusting_two_keys_accepts_either_during_rotation(tmp_path):
    current, upcoming = _signer(), _signer()
    ring = tmp_path / "keys.pem"  # what an app ships: the current key and the next one, in one file
    ring.write_bytes(current.public_pem() + upcoming.public_pem())
    trusted = TrustedKeys.from_files([ring])
    assert set(trusted.key_ids) == {current.key_id, upcoming.key_id}
    for signer in (current, upcoming):
        assert trusted.verify(MANIFEST, signer.sign(MANIFEST).to_bytes()) == signer.key_id


def _key_id_of(folder: str, queue) -> None:
    queue.put(load_or_create_signing_key(folder).key_id)


def test_the_signing_key_is_created_once_private_and_exported(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_key_id_of, args=(str(tmp_path), queue)) for _ in range(4)]  # gunicorn workers
    for p in procs:
        p.start()
    ids = {queue.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(10)
    assert len(ids) == 1  # they all use the one key that won
    assert stat.S_IMODE((tmp_path / SIGNING_KEY_FILE).stat().st_mode) == 0o600
    signer = load_or_create_signing_key(tmp_path)
    assert signer.key_id in ids and (tmp_path / PUBLIC_KEY_FILE).read_bytes() == signer.public_pem()
    assert list(tmp_path.glob(".*.tmp")) == []


# A real server and a real device ------------------------------------------------------------

@pytest.fixture
def serve(edge_model, tmp_path):
    servers = []

    def _start(goal_clients: int = 5) -> ServeProcess:
        servers.append(ServeProcess(tmp_path / "state", edge_model, "--min-clients", "1", "--goal-clients",
                                    str(goal_clients), "--round-timeout", "600", "--retry-after", "1",
                                    log=tmp_path / "serve.log"))
        return servers[-1]

    yield _start
    for s in servers:
        s.stop()


def test_the_server_signs_what_it_publishes_and_exports_its_key(serve, tmp_path):
    server = serve()
    state = tmp_path / "state"
    assert stat.S_IMODE((state / SIGNING_KEY_FILE).stat().st_mode) == 0o600
    public = (state / PUBLIC_KEY_FILE).read_bytes()
    served = requests.get(f"{server.url}/v1/models/signing-key", timeout=10)
    assert served.status_code == 200 and served.content == public
    manifest = requests.get(f"{server.url}/v1/models/1/manifest.json", timeout=10).content
    signature = requests.get(f"{server.url}/v1/models/1/{SIGNATURE_FILE}", timeout=10).content
    assert TrustedKeys.from_pem(public).verify(manifest, signature) == served.headers["X-Key-Id"]
    assert (state / "models" / "1" / SIGNATURE_FILE).read_bytes() == signature


def test_a_real_servers_versions_verify_on_a_real_device_and_tampering_is_refused(serve, text_file, tmp_path):
    server = serve(goal_clients=1)  # one update publishes the next version
    key = tmp_path / "state" / PUBLIC_KEY_FILE
    home = tmp_path / "phone"
    flags = ("--state", ALL_MET, "--min-new-examples", "0", "--model-signing-key", str(key), "--once",
             "--format", "json")
    (first,) = run_device(server.url, home, *flags, "--text", str(text_file)).reports
    assert (first["action"], first["model_version"]) == ("accepted", 1), first
    assert (home / "models" / "v1" / SIGNATURE_FILE).is_file()
    wait_for(lambda: (s := status(server.url))["model_version"] == 2 and (s["round"] or {}).get("id") == 2,
             what="version 2 published and round 2 open")

    proxy = FaultProxy(server.url)  # someone in between rewrites the manifest of version 2
    proxy.rewrite = {suffix: (lambda body: body.replace(b'"seq_len": 6', b'"seq_len": 7'))
                     for suffix in ("/latest", "/2/manifest.json")}
    try:
        run = run_device(proxy.url, home, *flags)
    finally:
        proxy.stop()
    (tampered,) = run.reports
    assert tampered["action"] == "model_rejected" and "signature does not match" in tampered["reasons"][0], tampered
    assert json.loads((home / "models" / "state.json").read_text())["current"] == 1
    assert not (home / "models" / "v2").exists()

    (honest,) = run_device(server.url, home, *flags).reports  # the real server's version 2 verifies
    assert (honest["action"], honest["model_version"]) == ("accepted", 2), honest
    assert load_manifest(home / "models" / "v2").version == 2
    assert status(server.url)["totals"]["accepted"] == 2


def test_a_device_configured_with_another_key_refuses_the_servers_versions(serve, text_file, tmp_path):
    server = serve()
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(_signer().public_pem())
    run = run_device(server.url, tmp_path / "phone", "--state", ALL_MET, "--text", str(text_file),
                     "--model-signing-key", str(wrong), "--once", "--format", "json")
    (report,) = run.reports
    assert report["action"] == "model_rejected" and "does not trust" in report["reasons"][0], report
    assert not (tmp_path / "phone" / "models" / "v1").exists()
    assert status(server.url)["totals"]["accepted"] == 0


def test_unsigned_versions_and_a_changed_server_key_are_refused(edge_model, text_file, tmp_path):
    """The device pins the key at enrollment; a server that later serves no signature, or signs
    with another key (and offers that key), gets nothing installed; the old version keeps serving."""
    pinned, impostor = _signer(), _signer()
    home = tmp_path / "phone"
    flags = ("--state", ALL_MET, "--min-new-examples", "0", "--poll", "0.01", "--format", "json")
    first = HostileServer({1: edge_model}, pinned, [Step(1, wait())])
    try:
        assert run_device(first.url, home, *flags, "--once", "--text", str(text_file)).reports[0]["action"] == "wait"
    finally:
        first.stop()
    assert (home / "model_signing_keys.pem").read_bytes() == public_key_pem(pinned.public_key)

    v2 = bump_version(edge_model, tmp_path / "v2", 2)
    unsigned = HostileServer({1: edge_model, 2: v2}, None, [Step(2, task(model_version=2))])
    other_key = HostileServer({1: edge_model, 2: v2}, impostor, [Step(2, task(model_version=2))])
    try:
        for server, words in ((unsigned, "unsigned"), (other_key, "does not trust")):
            (report,) = run_device(server.url, home, *flags, "--once").reports
            assert report["action"] == "model_rejected" and words in report["reasons"][0], report
    finally:
        unsigned.stop()
        other_key.stop()
    assert other_key.requested("GET /v1/models/signing-key") == []  # the pinned key is never re-fetched
    assert json.loads((home / "models" / "state.json").read_text())["current"] == 1
    assert not (home / "models" / "v2").exists()
    assert (home / "model_signing_keys.pem").read_bytes() == public_key_pem(pinned.public_key)
