"""Session fixtures: one tiny prepared dataset and one tiny exported model, built once.

Conversion costs seconds even at tiny sizes, so every test that needs a real TFLite model
shares these. Import the fixtures into a test module with `from tests.fixtures_model import *`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import write_jsonl

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY = dict(embed_dim=8, lstm_units=16, batch_size=4, seq_len=6)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared folder from a small JSONL corpus (12 clients, vocabulary ≤ 60)."""
    from datasets.prepare import PrepareConfig, prepare_dataset
    from datasets.splits import SplitConfig

    root = tmp_path_factory.mktemp("tiny_data")
    src = write_jsonl(root / "users.jsonl", clients=12, lines_per_client=10)
    out = root / "prepared"
    prepare_dataset(PrepareConfig(dataset=f"jsonl:{src}", vocab_size=60, split=SplitConfig(min_words=10)),
                    out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_data):
    from datasets.prepared import load_prepared
    from model.config import ModelConfig

    return ModelConfig(vocab_size=load_prepared(tiny_data).vocab_size, **TINY)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_data, tiny_config) -> Path:
    """An exported version-1 model folder (trainable + quantized inference + manifest)."""
    from export.pipeline import export_model

    out = tmp_path_factory.mktemp("tiny_model") / "v1"
    export_model(tokenizer_path=tiny_data / "tokenizer.model", out_dir=out, config=tiny_config)
    return out


@pytest.fixture(scope="session")
def tiny_float_model(tmp_path_factory, tiny_data, tiny_config) -> Path:
    """The same model with a float (unquantized) inference model, for exact comparisons."""
    from export.pipeline import export_model

    out = tmp_path_factory.mktemp("tiny_float_model") / "v1"
    export_model(tokenizer_path=tiny_data / "tokenizer.model", out_dir=out, config=tiny_config, quantize=False)
    return out
