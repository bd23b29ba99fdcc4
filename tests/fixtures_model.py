"""Session fixtures: one tiny prepared dataset and one tiny exported model, built once.

Conversion costs seconds even at tiny sizes, so every test that needs a real TFLite model
shares these. Import the fixtures into a test module with `from tests.fixtures_model import *`.
Each importing module gets its own copy of a fixture definition (pytest keys fixtures by where
they are found), so the folders are cached here, per process: built once per test session
however many modules import them. Tests only read them (copy a folder to change it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_jsonl

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY = dict(embed_dim=8, lstm_units=16, batch_size=4, seq_len=6)
_BUILT: dict[str, Path] = {}


def build_tiny_data(tmp_path_factory) -> Path:
    """The `tiny_data` folder, prepared on first use (tests.fixtures_edge's `edge_model` is the
    tiny model too and shares it)."""
    if "data" not in _BUILT:
        from datasets.prepare import PrepareConfig, prepare_dataset
        from datasets.splits import SplitConfig

        root = tmp_path_factory.mktemp("tiny_data")
        src = write_jsonl(root / "users.jsonl", clients=12, lines_per_client=10)
        out = root / "prepared"
        prepare_dataset(PrepareConfig(dataset=f"jsonl:{src}", vocab_size=60, split=SplitConfig(min_words=10)),
                        out, progress=False)
        _BUILT["data"] = out
    return _BUILT["data"]


def build_tiny_model(tmp_path_factory) -> Path:
    """The `tiny_model` folder, exported on first use."""
    if "model" not in _BUILT:
        from datasets.prepared import load_prepared
        from export.pipeline import export_model
        from model.config import ModelConfig

        data = build_tiny_data(tmp_path_factory)
        out = tmp_path_factory.mktemp("tiny_model") / "v1"
        export_model(tokenizer_path=data / "tokenizer.model", out_dir=out,
                     config=ModelConfig(vocab_size=load_prepared(data).vocab_size, **TINY))
        _BUILT["model"] = out
    return _BUILT["model"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared folder from a small JSONL corpus (12 clients, vocabulary ≤ 60).

    The same arrays and tokenizer as `fedkb simulate --dataset jsonl:` prepares from that corpus
    with --vocab-size 60 (its 12 clients all pass the default minimum of 64 words too)."""
    return build_tiny_data(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_config(tiny_data):
    from datasets.prepared import load_prepared
    from model.config import ModelConfig

    return ModelConfig(vocab_size=load_prepared(tiny_data).vocab_size, **TINY)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_data, tiny_config) -> Path:
    """An exported version-1 model folder (trainable + quantized inference + manifest)."""
    return build_tiny_model(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_float_model(tmp_path_factory, tiny_data, tiny_config) -> Path:
    """The same model with a float (unquantized) inference model, for exact comparisons."""
    if "float_model" not in _BUILT:
        from export.pipeline import export_model

        out = tmp_path_factory.mktemp("tiny_float_model") / "v1"
        export_model(tokenizer_path=tiny_data / "tokenizer.model", out_dir=out, config=tiny_config, quantize=False)
        _BUILT["float_model"] = out
    return _BUILT["float_model"]


def seed_initial_model(out: Path, model: Path) -> Path:
    """Put the exported `model` where a simulation into `out` looks for its initial model first.

    `fedkb simulate --out OUT` (and `simulation.run.simulate`) exports its initial model into
    OUT/initial_model unless a complete one (with its manifest) is already there, as on a rerun.
    Export is deterministic: the same model config and tokenizer give byte-identical files (only
    the manifest's `created` time differs), so a run started from a copy of an export of its own
    config and data is the run it would have been, minus seconds of conversion. Tests that seed
    call `assert_seeded_model_used` on the run's report; the full pipeline, export included,
    runs in test_simulation_fleet.py's `simulated` fixture."""
    dest = Path(out) / "initial_model"
    shutil.copytree(model, dest)
    return dest


def assert_seeded_model_used(report: dict, seeded: Path) -> None:
    """The run's model config is the seeded model's: the seed is the model the run would have
    exported (a run takes the model in its folder as it is, whatever its flags say)."""
    manifest = json.loads((seeded / "manifest.json").read_text())
    assert report["config"]["model"] == manifest["model_config"], (report["config"]["model"], manifest["model_config"])
