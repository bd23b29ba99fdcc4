"""manifest.json parsing and file verification, with real files on disk."""

import json

import pytest

from fedkb_core.manifest import (FileEntry, Manifest, ManifestError, load_manifest, sha256_bytes, verify_files,
                            write_manifest)
from fedkb_core.wire import WeightSpec


def _version_dir(tmp_path):
    files = {"trainable.tflite": b"trainable-bytes", "tokenizer.model": b"tok"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    manifest = Manifest(
        version=2, parent_version=1, created="2026-11-23T00:00:00Z",
        files={n: FileEntry(sha256_bytes(d), len(d)) for n, d in files.items()},
        tokenizer_sha256=sha256_bytes(b"tok"), vocab_size=100, batch_size=4, seq_len=8,
        weights=(WeightSpec("embedding", (100, 8)), WeightSpec("output_bias", (100,))),
    )
    write_manifest(tmp_path, manifest)
    return manifest


def test_write_load_verify_round_trip(tmp_path):
    manifest = _version_dir(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    verify_files(tmp_path, loaded)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda d: (d / "trainable.tflite").write_bytes(b"trainable-BYTES"), "sha256 differs"),
        (lambda d: (d / "trainable.tflite").write_bytes(b"short"), "bytes, manifest says"),
        (lambda d: (d / "tokenizer.model").unlink(), "listed in the manifest but missing"),
    ],
)
def test_verify_names_the_bad_file(tmp_path, tamper, message):
    manifest = _version_dir(tmp_path)
    tamper(tmp_path)
    with pytest.raises(ManifestError, match=message):
        verify_files(tmp_path, manifest)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b.pop("weights"), "malformed manifest"),
        (lambda b: b.update(format_version=9), "format_version 9"),
        (lambda b: b.update(version="two"), "malformed manifest"),
        (lambda b: b.update(weights=[]), "lists no weights"),
    ],
)
def test_malformed_manifest(tmp_path, edit, message):
    _version_dir(tmp_path)
    body = json.loads((tmp_path / "manifest.json").read_text())
    edit(body)
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path)


def test_missing_or_garbage_manifest(tmp_path):
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
