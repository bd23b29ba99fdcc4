"""The suggestion model: constant weights, one token per call, state passed in and out.

A keystroke then costs one LSTM step instead of re-reading the whole prefix, and constant
weights let the converter quantize them (dynamic range: int8 weights, float activations). The
trainable model's `infer` is 20–60× slower, so suggestions never run through it.
"""

from __future__ import annotations

import tensorflow as tf

from export.lstm_graph import lstm_cell
from model.config import ModelConfig
from model.weights import WEIGHT_NAMES, Weights


class InferenceLM(tf.Module):
    """`step(token int32[1], h float32[1,H], c float32[1,H]) -> {logits [1,V], h, c}`."""

    def __init__(self, config: ModelConfig, weights: Weights):
        super().__init__(name="inference_lm")
        self.w = {name: tf.constant(weights[name], name=name) for name in WEIGHT_NAMES}
        H = config.lstm_units
        self.step = tf.function(self._step, input_signature=[
            tf.TensorSpec([1], tf.int32, name="token"),
            tf.TensorSpec([1, H], tf.float32, name="h"),
            tf.TensorSpec([1, H], tf.float32, name="c"),
        ])

    def _step(self, token, h, c):
        """Advance the recurrent state by one token; logits are for the token after it."""
        w = self.w
        x = tf.gather(w["embedding"], token)  # [1, E]
        z = tf.matmul(x, w["lstm_kernel"]) + w["lstm_bias"] + tf.matmul(h, w["lstm_recurrent_kernel"])
        h, c = lstm_cell(z, c)
        projected = tf.matmul(h, w["projection_kernel"]) + w["projection_bias"]
        logits = tf.matmul(projected, w["embedding"], transpose_b=True) + w["output_bias"]
        return {"logits": logits, "h": h, "c": c}
