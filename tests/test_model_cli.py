"""`fedkb baseline` and `fedkb export` end to end on the tiny prepared data, through `main([...])`."""

import contextlib
import io
import json
import math

import numpy as np
import pytest

from fedkb.cli import main
from fedkb_core.manifest import load_manifest, verify_files
from model import numpy_lm
from model.config import ModelConfig
from model.metrics import EvalResult
from model.weights import WEIGHT_NAMES, initial_weights, load_weights, save_weights
from tests.fixtures_model import *  # noqa: F401,F403

pytest.importorskip("tensorflow")

SIZE_FLAGS = ["--embed-dim", "8", "--lstm-units", "16", "--batch-size", "4", "--seq-len", "6"]
EVAL_KEYS = {f for f in EvalResult.__dataclass_fields__}


def _run(args):
    """(exit status, stdout) of one command (module fixtures cannot use capsys)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(args)
    return status, stdout.getvalue()


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("baseline")
    status, printed = _run(["baseline", "--data", str(tiny_data), "--out", str(out), "--steps", "3",
                            "--train-batch", "8", *SIZE_FLAGS])
    return status, out, printed


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, tiny_data, baseline_run):
    out = tmp_path_factory.mktemp("export") / "v3"
    status, printed = _run(["export", "--data", str(tiny_data), "--out", str(out), "--from-weights",
                            str(baseline_run[1] / "weights.safetensors"), "--version", "3", "--no-quantize",
                            *SIZE_FLAGS])
    return status, out, printed


def test_baseline_writes_metrics_and_weights(baseline_run, tiny_config):
    status, out, _ = baseline_run
    assert status == 0

    metrics = json.loads((out / "metrics.json").read_text())

    assert set(metrics) == {"model_config", "baseline_config", "eval_config", "train", "heldout", "test"}
    assert ModelConfig.from_json(metrics["model_config"]) == tiny_config
    assert metrics["train"]["steps"] == 3
    assert metrics["baseline_config"]["max_steps"] == 3 and metrics["baseline_config"]["batch_size"] == 8
    assert metrics["eval_config"]["seq_len"] == tiny_config.seq_len
    for split in ("heldout", "test"):
        assert set(metrics[split]) == EVAL_KEYS
        assert metrics[split]["tokens"] > 0 and metrics[split]["words"] > 0
        assert 1.0 < metrics[split]["token_perplexity"] < tiny_config.vocab_size * 1.5
        assert math.isfinite(metrics[split]["word_perplexity"])
        assert 0.0 <= metrics[split]["top1"] <= metrics[split]["top3"] <= 1.0
    assert math.isfinite(metrics["train"]["loss_first"])


def test_baseline_weights_load_and_moved_from_the_start(baseline_run, tiny_config):
    weights = load_weights(baseline_run[1] / "weights.safetensors", tiny_config)

    start = initial_weights(tiny_config)
    assert list(weights) == list(WEIGHT_NAMES)
    assert any(not np.array_equal(weights[n], start[n]) for n in WEIGHT_NAMES)  # Adam took 3 steps


def test_baseline_prints_a_summary(baseline_run):
    _, out, printed = baseline_run
    metrics = json.loads((out / "metrics.json").read_text())

    lines = printed.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("baseline: 3 steps")
    assert f"word perplexity {metrics['heldout']['word_perplexity']:.1f}" in lines[0]
    assert f"top-3 {metrics['heldout']['top3']:.3f}" in lines[0]
    assert str(out / "metrics.json") in lines[1]


def test_export_from_baseline_weights(exported_run, baseline_run, tiny_config):
    status, out, _ = exported_run
    assert status == 0

    manifest = load_manifest(out)
    verify_files(out, manifest)  # raises on any missing or altered file

    assert manifest.version == 3 and manifest.parent_version is None
    assert (manifest.vocab_size, manifest.batch_size, manifest.seq_len) == (
        tiny_config.vocab_size, tiny_config.batch_size, tiny_config.seq_len)
    assert [w.name for w in manifest.weights] == list(WEIGHT_NAMES)
    assert manifest.extra["inference_quantization"] == "none"
    assert set(manifest.files) == {"trainable.tflite", "inference.tflite", "tokenizer.model"}
    baseline = load_weights(baseline_run[1] / "weights.safetensors", tiny_config)
    exported = load_weights(out / "weights.safetensors", tiny_config)
    for name in WEIGHT_NAMES:
        np.testing.assert_array_equal(exported[name], baseline[name])


def test_exported_models_carry_the_baseline_weights(exported_run, baseline_run, tiny_config):
    from ai_edge_litert.interpreter import Interpreter

    out = exported_run[1]
    weights = load_weights(baseline_run[1] / "weights.safetensors", tiny_config)
    trainable = Interpreter(model_path=str(out / "trainable.tflite"), num_threads=2)
    got = trainable.get_signature_runner("get_weights")()
    for name in WEIGHT_NAMES:
        np.testing.assert_array_equal(got[name], weights[name])

    # --no-quantize: the float inference model steps exactly like the numpy model.
    step = Interpreter(model_path=str(out / "inference.tflite"), num_threads=2).get_signature_runner("step")
    h = c = np.zeros((1, tiny_config.lstm_units), np.float32)
    state = (h[0], c[0])
    for token in [2, 9, 8, 4, 11]:
        result = step(token=np.array([token], np.int32), h=h, c=c)
        h, c = result["h"], result["c"]
        logits, state = numpy_lm.step(weights, token, state)
        np.testing.assert_allclose(result["logits"][0], logits, atol=1e-5)


def test_export_prints_version_parameters_and_sizes(exported_run, tiny_config):
    _, out, printed = exported_run
    manifest = load_manifest(out)

    assert printed.count("\n") == 1
    assert printed.startswith(f"exported version 3 ({tiny_config.num_parameters:,} parameters) to {out}")
    for name, entry in manifest.files.items():
        assert f"{name} {entry.bytes / 1e6:.2f} MB" in printed
    assert manifest.extra["num_parameters"] == tiny_config.num_parameters


# --- bad inputs: exit status 2, one line naming the problem, nothing written ---------------------

def _weights_file(tmp_path, config, change):
    weights = initial_weights(config)
    change(weights)
    path = tmp_path / "weights.safetensors"
    save_weights(path, weights)
    return path


def _wrong_shape(w):
    w["lstm_recurrent_kernel"] = np.zeros((3, 3), np.float32)


def _missing(w):
    del w["output_bias"]


def _nan(w):
    w["projection_bias"][0] = np.nan


@pytest.mark.parametrize("change, message", [
    (_wrong_shape, "lstm_recurrent_kernel has shape (3, 3), the model needs (16, 64)"),
    (_missing, "weight names"),
    (_nan, "projection_bias contains NaN"),
], ids=["wrong shape", "missing weight", "nan"])
def test_export_rejects_bad_weights(tiny_data, tiny_config, tmp_path, capsys, change, message):
    weights = _weights_file(tmp_path, tiny_config, change)
    out = tmp_path / "model"

    status = main(["export", "--data", str(tiny_data), "--out", str(out), "--from-weights", str(weights), *SIZE_FLAGS])

    _assert_one_line_error(capsys, status, "export", message)
    assert not out.exists()


def test_export_rejects_weights_of_another_model_size(tiny_data, baseline_run, tmp_path, capsys):
    out = tmp_path / "model"
    flags = [f if f != "16" else "12" for f in SIZE_FLAGS]  # --lstm-units 12 against 16-unit weights

    status = main(["export", "--data", str(tiny_data), "--out", str(out),
                   "--from-weights", str(baseline_run[1] / "weights.safetensors"), *flags])

    _assert_one_line_error(capsys, status, "export", "lstm_kernel has shape (8, 64), the model needs (8, 48)")
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    (None, "weights file not found"),
    (b"\x00" * 64, "not a safetensors weights file"),
], ids=["missing file", "not safetensors"])
def test_export_rejects_unreadable_weights_file(tiny_data, tmp_path, capsys, content, message):
    path = tmp_path / "weights.safetensors"
    if content is not None:
        path.write_bytes(content)

    status = main(["export", "--data", str(tiny_data), "--out", str(tmp_path / "model"), "--from-weights", str(path),
                   *SIZE_FLAGS])

    _assert_one_line_error(capsys, status, "export", message)


@pytest.mark.parametrize("command, extra, message", [
    ("baseline", [], "no such folder"),
    ("export", [], "no such folder"),
], ids=["baseline", "export"])
def test_missing_data_dir(command, extra, message, tmp_path, capsys):
    status = main([command, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), *extra, *SIZE_FLAGS])

    _assert_one_line_error(capsys, status, command, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, extra, message", [
    ("baseline", ["--steps", "0"], "at least 1"),
    ("baseline", ["--epochs", "0"], "at least 1"),
    ("baseline", ["--lstm-units", "0"], "lstm_units must be positive"),
    ("export", ["--version", "0"], "--version must be at least 1"),
    ("export", ["--embed-dim", "-1"], "embed_dim must be positive"),
])
def test_impossible_settings(command, extra, message, tiny_data, tmp_path, capsys):
    status = main([command, "--data", str(tiny_data), "--out", str(tmp_path / "out"), *SIZE_FLAGS, *extra])

    _assert_one_line_error(capsys, status, command, message)


def _assert_one_line_error(capsys, status, command, message):
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"fedkb {command}: error:")
    assert message in lines[0]
