"""Attack: a broken model version, with every sha256 right, must never become current.

Before, a manifest listing no files verified and was activated ("trainable model not found"
on the next job), and a tokenizer swapped for a larger one with consistent sha256s was
activated too, after which training and suggestions crashed ("gather index out of bounds").
A real `fedkb device` against `HostileServer` now rejects each such version and keeps serving
(and training on) the old one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from datasets.tokenizer import load_tokenizer, train_tokenizer
from edge_runtime.model_store import ModelRejected, ModelStore
from fedkb_core.manifest import (INFERENCE_FILE, TOKENIZER_FILE, TRAINABLE_FILE, FileEntry, load_manifest,
                                 sha256_file, write_manifest)
from fedkb_core.signing import ManifestSigner
from tests.conftest import SAMPLE_LINES
from tests.fixtures_edge import edge_model, text_file, user_lines  # noqa: F401
from tests.fixtures_hostile import HostileServer, Step, run_device, task, wait

ALL_MET = "charging=1,idle=1,unmetered=1,battery=90"


def broken(source, dest, version: int, *, replace: dict | None = None, **fields):
    """`source` as `version`, files replaced (name -> path of the new content) with their sha256
    and size updated so that every checksum is right, and manifest fields changed."""
    shutil.copytree(source, dest)
    manifest = load_manifest(source)
    files = dict(manifest.files)
    for name, content in (replace or {}).items():
        shutil.copyfile(content, dest / name)
        files[name] = FileEntry(sha256_file(dest / name), (dest / name).stat().st_size)
    changes = dict(version=version, parent_version=1, files=files)
    if TOKENIZER_FILE in files:
        changes["tokenizer_sha256"] = files[TOKENIZER_FILE].sha256
    changes.update(fields)
    write_manifest(dest, dataclasses.replace(manifest, **changes))
    return dest


@pytest.fixture(scope="module")
def larger_tokenizer(edge_model, tmp_path_factory):
    """A real SentencePiece model with more pieces than the edge model's vocabulary."""
    vocab = load_tokenizer(edge_model / TOKENIZER_FILE).get_piece_size()
    corpus = [f"{line} {word}{i}" for i in range(40) for line in SAMPLE_LINES for word in ("alpha", "omega")]
    path = tmp_path_factory.mktemp("tokenizer") / TOKENIZER_FILE
    path.write_bytes(train_tokenizer(corpus, vocab_size=vocab * 2))
    assert load_tokenizer(path).get_piece_size() > vocab
    return path


@pytest.fixture
def broken_versions(edge_model, larger_tokenizer, tmp_path):
    vocab = load_manifest(edge_model).vocab_size
    bigger = load_tokenizer(larger_tokenizer).get_piece_size()
    return {
        2: broken(edge_model, tmp_path / "v2", 2, files={}),  # lists nothing at all
        3: broken(edge_model, tmp_path / "v3", 3, replace={TOKENIZER_FILE: larger_tokenizer}),  # vocab_size still old
        4: broken(edge_model, tmp_path / "v4", 4, replace={TOKENIZER_FILE: larger_tokenizer},  # manifest agrees,
                  vocab_size=bigger),                                                          # the models do not
        5: broken(edge_model, tmp_path / "v5", 5, replace={INFERENCE_FILE: edge_model / TRAINABLE_FILE}),  # no `step`
    }, vocab, bigger


def test_broken_versions_are_rejected_and_the_old_one_keeps_serving(edge_model, broken_versions, text_file,
                                                                     tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    versions, vocab, bigger = broken_versions
    script = [Step(1, wait())] + [Step(v, task(model_version=v, round_id=v)) for v in versions] + [Step(5, task())]
    server = HostileServer({1: edge_model, **versions}, ManifestSigner(Ed25519PrivateKey.generate()), script)
    home = tmp_path / "phone"
    try:
        run = run_device(server.url, home, "--state", ALL_MET, "--text", str(text_file), "--min-new-examples", "0",
                         "--poll", "0.01", "--cycles", str(len(script)), "--format", "json")
    finally:
        server.stop()
    cycles = run.reports
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert [c["action"] for c in cycles] == ["wait"] + ["model_rejected"] * len(versions) + ["accepted"], cycles
    reasons = [c["reasons"][0] for c in cycles[1:5]]
    assert "lists no trainable.tflite, inference.tflite, tokenizer.model" in reasons[0]
    assert f"the tokenizer has {bigger} pieces, the manifest's vocabulary is {vocab}" in reasons[1]
    assert f"weight 'embedding' has shape [{vocab}, 8], but the vocabulary is {bigger}" in reasons[2], reasons[2]
    assert "step" in reasons[3]
    assert json.loads((home / "models" / "state.json").read_text()) == {"current": 1, "previous": None}
    assert sorted(p.name for p in (home / "models").iterdir() if p.is_dir()) == ["v1"]  # nothing else kept
    # ... and the old version still trains: the last task (for version 1) was accepted.
    assert cycles[-1]["model_version"] == 1 and len(server.uploads) == 1


def test_a_broken_local_install_is_rejected_too(broken_versions, edge_model, tmp_path):
    versions, _, _ = broken_versions
    store = ModelStore(tmp_path / "models")
    store.install_local(edge_model)
    for version, folder in versions.items():
        with pytest.raises(ModelRejected, match=f"version {version} rejected, keeping version 1"):
            store.install_local(folder)
    assert (store.current_version, store.previous_version) == (1, None)
