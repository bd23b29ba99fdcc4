"""A version the server publishes computes with its new weights, in both of its TFLite files.

The server makes version v+1 by rewriting the weight buffers of version v's flatbuffers (no
converter run). These tests run the rewritten files in LiteRT and compare them with the numpy
reference model carrying the new weights: the trainable model exactly (its weights and its
loss), the inference model to float tolerance (float export) or to int8 tolerance (quantized).
"""

from __future__ import annotations

import numpy as np
import pytest

from datasets.prepared import load_prepared
from datasets.windows import iterate_batches, make_windows
from fedkb_core.manifest import load_manifest, verify_files
from model import numpy_lm
from model.metrics import token_nll
from model.weights import load_weights
from tests.fixtures_aggregator import Device, make_server, wait_for  # noqa: F401
from tests.fixtures_model import *  # noqa: F401,F403

TOKENS = [2, 7, 11, 5, 9, 13, 4]


def _moved(weights, seed=1, scale=0.05):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(scale=scale, size=v.shape)).astype(np.float32) for k, v in weights.items()}


def _litert_weights(model_dir):
    from edge_runtime.litert_model import TrainableModel

    return TrainableModel(model_dir).get_weights()


def _litert_loss(model_dir, batch):
    from edge_runtime.litert_model import TrainableModel

    loss_sum, tokens = TrainableModel(model_dir).evaluate(batch)
    return loss_sum / tokens


def _numpy_loss(weights, batch):
    logits, _, _ = numpy_lm.forward(weights, batch.x)
    return float((token_nll(logits, batch.y) * batch.mask).sum() / batch.mask.sum())


def _logits_after_tokens(step, state):
    """Logits after feeding TOKENS one step at a time, from `state`."""
    for t in TOKENS:
        logits, state = step(t, state)
    return np.asarray(logits, np.float64).ravel()


def _served_logits(model_dir):
    from edge_runtime.suggest import InferenceStepper

    stepper = InferenceStepper(model_dir / "inference.tflite")
    return _logits_after_tokens(stepper, stepper.zero_state())


def _numpy_logits(weights):
    units = weights["lstm_recurrent_kernel"].shape[0]
    zero = (np.zeros(units, np.float32), np.zeros(units, np.float32))
    return _logits_after_tokens(lambda t, state: numpy_lm.step(weights, t, state), zero)


def _batch(tiny_data, tiny_config):
    data = load_prepared(tiny_data)
    windows = make_windows(np.concatenate(list(data.train.values())), tiny_config.seq_len)
    return next(iter(iterate_batches(windows, batch_size=tiny_config.batch_size, seed=0)))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_float_model"])
def test_published_version_computes_with_new_weights(fixture, request, tiny_config, tiny_data, tmp_path):
    from aggregator.model_store import ModelStore
    from aggregator.publish import publish_version

    exported = request.getfixturevalue(fixture)
    store = ModelStore(tmp_path / "models")
    store.import_initial(exported)
    old = load_weights(exported / "weights.safetensors", tiny_config)
    new = _moved(old)
    manifest = publish_version(store, parent=1, version=2, weights=new)
    v2 = store.version_dir(2)
    verify_files(v2, load_manifest(v2))
    assert manifest.parent_version == 1

    got = _litert_weights(v2)
    for name in new:
        np.testing.assert_array_equal(got[name], new[name], err_msg=name)
    batch = _batch(tiny_data, tiny_config)
    assert abs(_litert_loss(v2, batch) - _numpy_loss(new, batch)) < 1e-4
    assert abs(_numpy_loss(new, batch) - _numpy_loss(old, batch)) > 1e-3, "the move must change the loss"

    served, wanted, before = _served_logits(v2), _numpy_logits(new), _numpy_logits(old)
    tolerance = 0.05 * np.abs(wanted).max() if fixture == "tiny_model" else 1e-4  # int8 weights vs float
    assert np.abs(served - wanted).max() < tolerance
    assert np.abs(served - wanted).max() < np.abs(served - before).max() / 4, "served logits follow the new weights"
