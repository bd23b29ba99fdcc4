"""The exported trainable model in the real LiteRT interpreter, against the Keras model."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from datasets.prepared import load_prepared
from datasets.windows import concat_windows, iterate_batches, make_windows
from fedkb_core.manifest import load_manifest, verify_files
from model.weights import WEIGHT_NAMES, load_weights
from tests.fixtures_model import *  # noqa: F401,F403

tf = pytest.importorskip("tensorflow")


def _interpreter(path):
    return Interpreter(model_path=str(path), num_threads=2)


def _batches(data_dir, config, n):
    data = load_prepared(data_dir)
    windows = concat_windows([make_windows(s, config.seq_len) for s in data.train.values()])
    return list(iterate_batches(windows, batch_size=config.batch_size, seed=0))[:n]


def test_signatures_and_manifest(tiny_model, tiny_config):
    manifest = load_manifest(tiny_model)
    verify_files(tiny_model, manifest)
    assert [w.name for w in manifest.weights] == list(WEIGHT_NAMES)
    assert (manifest.batch_size, manifest.seq_len, manifest.vocab_size) == (
        tiny_config.batch_size, tiny_config.seq_len, tiny_config.vocab_size)
    interpreter = _interpreter(tiny_model / "trainable.tflite")
    assert set(interpreter.get_signature_list()) == {"train", "evaluate", "infer", "get_weights", "set_weights"}


def test_builtin_ops_only(tiny_model):
    # LiteRT's pip runtime has no Flex delegate: a Flex op would fail to allocate here.
    for name in ("trainable.tflite", "inference.tflite"):
        data = (tiny_model / name).read_bytes()
        assert b"Flex" not in data
        interpreter = _interpreter(tiny_model / name)
        interpreter.allocate_tensors()


def test_keras_and_litert_agree_on_loss_and_weights_after_sgd_steps(tiny_model, tiny_data, tiny_config):
    from model.keras_model import build_keras_model, get_keras_weights, make_sgd_step, masked_nll

    weights = load_weights(tiny_model / "weights.safetensors", tiny_config)
    keras_model = build_keras_model(tiny_config, weights)
    interpreter = _interpreter(tiny_model / "trainable.tflite")
    train, evaluate = interpreter.get_signature_runner("train"), interpreter.get_signature_runner("evaluate")
    batches = _batches(tiny_data, tiny_config, 5)
    assert len(batches) == 5

    first = batches[0]
    loss_sum, tokens = masked_nll(first.y, keras_model(first.x), first.mask)
    result = evaluate(x=first.x, y=first.y, mask=first.mask)
    np.testing.assert_allclose(result["loss_sum"], loss_sum.numpy(), rtol=1e-5)
    assert float(result["tokens"]) == float(tokens)

    step = make_sgd_step(keras_model, 0.5)
    litert_losses, keras_losses = [], []
    for batch in batches:
        litert_losses.append(float(train(x=batch.x, y=batch.y, mask=batch.mask, lr=np.float32(0.5))["loss"]))
        keras_losses.append(float(step(batch.x, batch.y, batch.mask)))
    np.testing.assert_allclose(litert_losses, keras_losses, rtol=1e-5)
    after = interpreter.get_signature_runner("get_weights")()
    for name, value in get_keras_weights(keras_model).items():
        np.testing.assert_allclose(after[name], value, atol=1e-5, err_msg=name)


def test_loss_falls_and_padding_is_masked(tiny_model, tiny_data, tiny_config):
    interpreter = _interpreter(tiny_model / "trainable.tflite")
    train, evaluate = interpreter.get_signature_runner("train"), interpreter.get_signature_runner("evaluate")
    batch = _batches(tiny_data, tiny_config, 1)[0]
    before = float(evaluate(x=batch.x, y=batch.y, mask=batch.mask)["loss_sum"])
    noisy_y = np.where(batch.mask > 0, batch.y, (batch.y + 7) % tiny_config.vocab_size).astype(np.int32)
    assert float(evaluate(x=batch.x, y=noisy_y, mask=batch.mask)["loss_sum"]) == pytest.approx(before, rel=1e-6)
    for _ in range(60):
        train(x=batch.x, y=batch.y, mask=batch.mask, lr=np.float32(1.0))
    assert float(evaluate(x=batch.x, y=batch.y, mask=batch.mask)["loss_sum"]) < 0.8 * before


def test_set_weights_round_trip(tiny_model, tiny_config):
    interpreter = _interpreter(tiny_model / "trainable.tflite")
    rng = np.random.default_rng(1)
    new = {n: rng.normal(size=v.shape).astype(np.float32) for n, v in
           load_weights(tiny_model / "weights.safetensors", tiny_config).items()}
    interpreter.get_signature_runner("set_weights")(**new)
    got = interpreter.get_signature_runner("get_weights")()
    for name in WEIGHT_NAMES:
        np.testing.assert_array_equal(got[name], new[name])


def test_inference_step_matches_keras(tiny_float_model, tiny_model, tiny_config):
    from model.keras_model import build_keras_model

    weights = load_weights(tiny_float_model / "weights.safetensors", tiny_config)
    keras_logits = build_keras_model(tiny_config, weights)(np.array([[2, 5, 9, 11, 4]], np.int32)).numpy()[0]
    H = tiny_config.lstm_units
    for model_dir, atol in ((tiny_float_model, 1e-5), (tiny_model, None)):
        step = _interpreter(model_dir / "inference.tflite").get_signature_runner("step")
        h = c = np.zeros((1, H), np.float32)
        logits = []
        for token in [2, 5, 9, 11, 4]:
            out = step(token=np.array([token], np.int32), h=h, c=c)
            h, c = out["h"], out["c"]
            logits.append(out["logits"][0])
        logits = np.array(logits)
        if atol is not None:
            np.testing.assert_allclose(logits, keras_logits, atol=atol)
        else:  # quantized: int8 weights; the ranking barely moves
            assert np.mean(logits.argmax(1) == keras_logits.argmax(1)) >= 0.6
            assert np.abs(logits - keras_logits).max() < 0.1 * np.abs(keras_logits).max() + 0.05
