"""The numpy forward pass (model/numpy_lm.py) against the Keras model it must reproduce."""

import numpy as np
import pytest

from model import numpy_lm
from model.config import ModelConfig
from model.weights import weight_specs

tf = pytest.importorskip("tensorflow")

CONFIGS = {
    "tiny": ModelConfig(vocab_size=11, embed_dim=4, lstm_units=5),
    "wider": ModelConfig(vocab_size=40, embed_dim=8, lstm_units=16),
}


def _random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.5):
    """Random weights, biases included (the seeded initial biases are zero and would hide a bias bug)."""
    rng = np.random.default_rng(seed)
    return {s.name: rng.normal(0.0, scale, s.shape).astype(np.float32) for s in weight_specs(config)}


def _tokens(config: ModelConfig, n: int, t: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (n, t)).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    """(config, weights, the Keras model with those weights): one Keras build per config."""
    from model.keras_model import build_keras_model

    config = CONFIGS[request.param]
    weights = _random_weights(config)
    return config, weights, build_keras_model(config, weights)


@pytest.mark.parametrize("n, t", [(1, 1), (1, 9), (3, 7)])
def test_forward_matches_keras_logits(case, n, t):
    config, weights, keras_model = case
    x = _tokens(config, n, t)

    logits, hs, cs = numpy_lm.forward(weights, x)

    assert logits.shape == (n, t, config.vocab_size)
    assert hs.shape == cs.shape == (n, t, config.lstm_units)
    np.testing.assert_allclose(logits, keras_model(x).numpy(), atol=1e-5, rtol=0)


def test_forward_states_match_keras_lstm(case):
    config, weights, keras_model = case
    x = _tokens(config, 2, 6)
    lstm_out = tf.keras.Model(keras_model.input, keras_model.get_layer("lstm").output)

    _, hs, _ = numpy_lm.forward(weights, x)

    np.testing.assert_allclose(hs, lstm_out(x).numpy(), atol=1e-6, rtol=0)


def test_step_by_step_equals_forward(case):
    config, weights, _ = case
    x = _tokens(config, 3, 8, seed=2)
    logits, hs, cs = numpy_lm.forward(weights, x)

    for row in range(x.shape[0]):
        state = (np.zeros(config.lstm_units, np.float32), np.zeros(config.lstm_units, np.float32))
        for t, token in enumerate(x[row]):
            step_logits, state = numpy_lm.step(weights, int(token), state)
            np.testing.assert_allclose(step_logits, logits[row, t], atol=1e-6, rtol=0)
            np.testing.assert_allclose(state[0], hs[row, t], atol=1e-6, rtol=0)
            np.testing.assert_allclose(state[1], cs[row, t], atol=1e-6, rtol=0)


def test_step_accepts_batched_state_of_inference_model_shape(case):
    # The LiteRT inference model passes h, c as [1, H]; the numpy step must give the same numbers.
    config, weights, _ = case
    flat = (np.full(config.lstm_units, 0.1, np.float32), np.full(config.lstm_units, -0.2, np.float32))
    batched = (flat[0][None], flat[1][None])

    logits_flat, (h_flat, c_flat) = numpy_lm.step(weights, 4, flat)
    logits_batched, (h_batched, c_batched) = numpy_lm.step(weights, 4, batched)

    assert logits_batched.shape == (1, config.vocab_size)
    np.testing.assert_allclose(logits_batched[0], logits_flat, atol=1e-7)
    np.testing.assert_allclose(h_batched[0], h_flat, atol=1e-7)
    np.testing.assert_allclose(c_batched[0], c_flat, atol=1e-7)


def test_rows_are_independent(case):
    # Each row starts from zero state: a row's logits do not depend on the other rows.
    config, weights, _ = case
    x = _tokens(config, 4, 5, seed=3)

    together, _, _ = numpy_lm.forward(weights, x)
    alone, _, _ = numpy_lm.forward(weights, x[2:3])

    np.testing.assert_allclose(together[2:3], alone, atol=1e-6, rtol=0)  # batched matmul rounding


def test_extreme_activations_stay_finite():
    # Huge pre-activations saturate the gates; the overflow-free sigmoid must not warn or give NaN.
    config = CONFIGS["tiny"]
    weights = _random_weights(config, scale=400.0)
    x = _tokens(config, 2, 5)

    with np.errstate(over="raise", invalid="raise"):
        logits, hs, cs = numpy_lm.forward(weights, x)

    assert np.all(np.isfinite(logits))
    assert np.all(np.abs(hs) <= 1.0)
    assert np.all(np.isfinite(cs))
