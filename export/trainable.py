"""The on-device trainable model: a tf.Module whose named signatures the edge runtime calls.

Signatures (docs/architecture.md): `train(x, y, mask, lr) -> {loss}` (one SGD step), `evaluate(x, y,
mask) -> {loss_sum, tokens, correct}`, `infer(x) -> {logits}`, `get_weights() -> {name: tensor}`,
`set_weights(name=tensor, ...) -> {ok}`. Shapes are static ([B, T] from the ModelConfig), as
training in TFLite needs. Pattern after tensorflow/examples' model_personalization
`generate_training_model.py`, without its SELECT_TF_OPS.
"""

from __future__ import annotations

import tensorflow as tf

from export.lstm_graph import sequence_logits, token_nll
from model.config import ModelConfig
from model.weights import WEIGHT_NAMES, Weights, weight_specs


class TrainableLM(tf.Module):
    """Variables named as in model.weights, plus the five signatures."""

    def __init__(self, config: ModelConfig, weights: Weights):
        super().__init__(name="trainable_lm")
        self.config = config
        self.vars = {name: tf.Variable(weights[name], name=name, dtype=tf.float32) for name in WEIGHT_NAMES}
        B, T = config.batch_size, config.seq_len
        batch = [tf.TensorSpec([B, T], tf.int32, name="x"), tf.TensorSpec([B, T], tf.int32, name="y"),
                 tf.TensorSpec([B, T], tf.float32, name="mask")]
        self.train = tf.function(self._train, input_signature=batch + [tf.TensorSpec([], tf.float32, name="lr")])
        self.evaluate = tf.function(self._evaluate, input_signature=batch)
        self.infer = tf.function(self._infer, input_signature=[tf.TensorSpec([B, T], tf.int32, name="x")])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(
            self._set_weights,
            input_signature=[tf.TensorSpec(s.shape, tf.float32, name=s.name) for s in weight_specs(config)],
        )

    def _logits(self, x):
        c = self.config
        return sequence_logits(self.vars, x, batch_size=c.batch_size, seq_len=c.seq_len,
                               embed_dim=c.embed_dim, lstm_units=c.lstm_units)

    def _train(self, x, y, mask, lr):
        """One SGD step on the masked mean token NLL; returns the loss before the step."""
        m = tf.reshape(mask, [-1])
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(token_nll(self._logits(x), y, self.config.vocab_size) * m) / tf.maximum(tf.reduce_sum(m), 1.0)
        variables = [self.vars[n] for n in WEIGHT_NAMES]
        for var, grad in zip(variables, tape.gradient(loss, variables), strict=True):
            var.assign(var - lr * tf.convert_to_tensor(grad))
        return {"loss": loss}

    def _evaluate(self, x, y, mask):
        """Sum of masked NLL, masked token count, and masked top-1 token hits; no weight change."""
        m = tf.reshape(mask, [-1])
        logits = self._logits(x)
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), tf.reshape(y, [-1])), tf.float32)
        return {
            "loss_sum": tf.reduce_sum(token_nll(logits, y, self.config.vocab_size) * m),
            "tokens": tf.reduce_sum(m),
            "correct": tf.reduce_sum(hits * m),
        }

    def _infer(self, x):
        """Next-token logits [B, T, V] for each position (slow path; suggestions use inference.tflite)."""
        c = self.config
        return {"logits": tf.reshape(self._logits(x), [c.batch_size, c.seq_len, c.vocab_size])}

    def _get_weights(self):
        """Every weight by name (a copy, so reading never aliases a variable)."""
        return {name: tf.identity(self.vars[name]) for name in WEIGHT_NAMES}

    def _set_weights(self, *values):
        """Replace every weight; returns a dummy output because TFLite signatures need one."""
        for name, value in zip(WEIGHT_NAMES, values, strict=True):
            self.vars[name].assign(value)
        return {"ok": tf.constant(1, tf.int32)}

    def signatures(self) -> dict:
        return {name: getattr(self, name).get_concrete_function()
                for name in ("train", "evaluate", "infer", "get_weights", "set_weights")}
