"""Attack: huge and endless replies must cost a real `fedkb device` no more than its own limits.

Before, a manifest declaring `"bytes": 10**12` with an endless body made the device write
2 × 200 MiB to disk, and a 200 MiB check-in reply of whitespace was read whole (peak RSS 482 MB
vs 187 MB). Now every reply is read against the device's byte budgets (`DownloadLimits`) and
a version is checked against them, and against the free storage, before a byte is written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from edge_runtime.version_check import SUGGESTION_FILES
from fedkb_core.manifest import TRAINABLE_FILE, FileEntry, load_manifest, verify_files, write_manifest
from fedkb_core.signing import ManifestSigner
from tests.fixtures_edge import edge_model, text_file, user_lines  # noqa: F401
from tests.fixtures_hostile import MiB, Endless, HostileServer, Step, home_bytes, run_device, task, wait

ALL_MET = "charging=1,idle=1,unmetered=1,battery=90"


@pytest.fixture
def signer():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return ManifestSigner(Ed25519PrivateKey.generate())


def relabelled(source, dest, version: int, **file_sizes):
    """`source` as version `version`, with some files listed at other sizes."""
    shutil.copytree(source, dest)
    manifest = load_manifest(source)
    files = {name: (FileEntry(entry.sha256, file_sizes[name]) if name in file_sizes else entry)
             for name, entry in manifest.files.items()}
    write_manifest(dest, dataclasses.replace(manifest, version=version, parent_version=1, files=files))
    return dest


def test_huge_declared_sizes_and_endless_bodies_stay_within_the_limits(edge_model, signer, tmp_path):
    v2 = relabelled(edge_model, tmp_path / "v2", 2, **{TRAINABLE_FILE: 10 ** 12})  # 1 TB, says the manifest
    v3 = relabelled(edge_model, tmp_path / "v3", 3, **{TRAINABLE_FILE: 2 * MiB})  # plausible, but never ends
    server = HostileServer({1: edge_model, 2: v2, 3: v3}, signer, [
        Step(1, wait()), Step(2, task(model_version=2)), Step(3, task(model_version=3)), Step(3, wait())])
    server.overrides["GET /v1/models/2/trainable.tflite"] = Endless(fill=b"\0")
    server.overrides["GET /v1/models/3/trainable.tflite"] = Endless(fill=b"\0")
    home = tmp_path / "phone"
    try:
        run = run_device(server.url, home, "--state", ALL_MET, "--min-new-examples", "0", "--poll", "0.01",
                         "--cycles", "3", "--format", "json")
    finally:
        server.stop()
    cycles = run.reports
    assert [c["action"] for c in cycles] == ["wait", "model_rejected", "model_rejected"], cycles
    assert "1000000000000 bytes; this device downloads files of at most 67108864" in cycles[1]["reasons"][0]
    assert "more than the 2097152 bytes expected" in cycles[2]["reasons"][0]
    assert server.requested("GET /v1/models/2/trainable.tflite") == []  # refused before a byte was fetched
    assert server.sent.get("/v1/models/3/trainable.tflite", 0) < 32 * MiB  # read up to 2 MiB, then hung up
    assert home_bytes(home) < 2 * MiB  # v1 (~0.4 MB) and the example store; no partial download left
    # The keyboard follows v3 (its inference model and tokenizer are v1's, held already), but v3's
    # trainable model, the endless one, never landed: its task was refused as a rejected model.
    assert json.loads((home / "models" / "state.json").read_text()) == {"current": 3, "previous": 1}
    assert not (home / "models" / "v3" / TRAINABLE_FILE).exists()
    verify_files(home / "models" / "v3", load_manifest(home / "models" / "v3"), SUGGESTION_FILES)
    verify_files(home / "models" / "v1", load_manifest(home / "models" / "v1"), SUGGESTION_FILES)  # whole, as held
    assert "Traceback" not in run.stderr


def test_a_version_that_would_fill_the_storage_is_not_downloaded(edge_model, signer, tmp_path):
    v2 = relabelled(edge_model, tmp_path / "v2", 2)
    server = HostileServer({1: edge_model, 2: v2}, signer, [Step(2, wait())])
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"min_free_bytes": 2 ** 62}))  # more than any disk has free
    try:
        run = run_device(server.url, tmp_path / "phone", "--state", ALL_MET, "--min-new-examples", "0", "--once",
                         "--limits", str(limits), "--format", "json")
    finally:
        server.stop()
    (report,) = run.reports
    assert report["action"] == "wait"  # the cycle went on without a new model
    assert "not enough free storage" in run.stderr
    assert [r for r in server.requests if r.startswith("GET /v1/models/2/") and "manifest" not in r] == []
    assert not (tmp_path / "phone" / "models" / "v2").exists()


@pytest.mark.parametrize("path", ["POST /v1/checkin", "GET /v1/models/latest"])
def test_an_endless_json_reply_is_cut_off_at_the_budget(edge_model, signer, text_file, tmp_path, path):
    """200 MiB of whitespace where JSON belongs: read up to the budget, then refused."""
    calm = HostileServer({1: edge_model}, signer, [Step(1, wait())])
    hostile = HostileServer({1: edge_model}, signer, [Step(1, wait())])
    hostile.overrides[path] = Endless(prefix=b"{", fill=b" " * 4096)
    try:
        baseline = run_device(calm.url, tmp_path / "calm", "--state", ALL_MET, "--text", str(text_file), "--once",
                              "--format", "json")
        run = run_device(hostile.url, tmp_path / "phone", "--state", ALL_MET, "--text", str(text_file), "--once",
                         "--format", "json")
    finally:
        calm.stop()
        hostile.stop()
    assert baseline.reports[0]["action"] == "wait"
    (report,) = run.reports
    if path == "POST /v1/checkin":
        assert (report["action"], report["reasons"]) == ("error", ["reply_too_large"]), report
    else:  # the manifest: a rejected model version, and the check-in goes ahead without one
        assert report["action"] == "wait" and "larger than the 4194304 bytes" in run.stderr
    assert hostile.sent[path.split(" ")[1]] < 32 * MiB  # of the 200 MiB offered
    assert run.peak_rss_mb < baseline.peak_rss_mb + 40, (run.peak_rss_mb, baseline.peak_rss_mb)
    assert "Traceback" not in run.stderr
