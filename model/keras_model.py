"""The next-word LSTM in Keras: embedding → LSTM → projection → output tied to the embedding.

Tying the output layer to the input embedding (Press & Wolf, 2017,
https://arxiv.org/abs/1608.05859) is what keeps a keyboard model near 1M parameters with an
8k vocabulary: the projection maps the LSTM state back to the embedding size, and the logits are
that projection times the embedding matrix, plus a bias. This Keras model is the reference the
hand-unrolled TFLite model (export/trainable.py) must match.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from model.config import ModelConfig
from model.weights import WEIGHT_NAMES, Weights, check_weights, initial_weights


class TiedOutput(tf.keras.layers.Layer):
    """logits = x · embeddingᵀ + bias, sharing the embedding layer's matrix."""

    def __init__(self, embedding: tf.keras.layers.Embedding, vocab_size: int, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding
        self.vocab_size = vocab_size

    def build(self, input_shape):
        self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros")
        super().build(input_shape)

    def call(self, x):
        return tf.matmul(x, self.embedding.embeddings, transpose_b=True) + self.bias


def build_keras_model(config: ModelConfig, weights: Weights | None = None) -> tf.keras.Model:
    """The Keras model with `weights` (default: the seeded initial weights) loaded."""
    tokens = tf.keras.Input(shape=(None,), dtype=tf.int32, name="tokens")
    embedding = tf.keras.layers.Embedding(config.vocab_size, config.embed_dim, name="embedding")
    x = embedding(tokens)
    x = tf.keras.layers.LSTM(config.lstm_units, return_sequences=True, name="lstm")(x)
    x = tf.keras.layers.Dense(config.embed_dim, name="projection")(x)
    logits = TiedOutput(embedding, config.vocab_size, name="output")(x)
    model = tf.keras.Model(tokens, logits, name="next_word_lstm")
    set_keras_weights(model, weights if weights is not None else initial_weights(config))
    return model


def _slots(model: tf.keras.Model) -> dict[str, tf.Variable]:
    lstm = model.get_layer("lstm").cell
    return {
        "embedding": model.get_layer("embedding").embeddings,
        "lstm_kernel": lstm.kernel,
        "lstm_recurrent_kernel": lstm.recurrent_kernel,
        "lstm_bias": lstm.bias,
        "projection_kernel": model.get_layer("projection").kernel,
        "projection_bias": model.get_layer("projection").bias,
        "output_bias": model.get_layer("output").bias,
    }


def get_keras_weights(model: tf.keras.Model) -> Weights:
    slots = _slots(model)
    return {name: slots[name].numpy().astype(np.float32) for name in WEIGHT_NAMES}


def set_keras_weights(model: tf.keras.Model, weights: Weights) -> None:
    slots = _slots(model)
    for name in WEIGHT_NAMES:
        slots[name].assign(weights[name])


def masked_nll(y: tf.Tensor, logits: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of masked token NLL, number of masked-in tokens)."""
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits)
    mask = tf.cast(mask, nll.dtype)
    return tf.reduce_sum(nll * mask), tf.reduce_sum(mask)


def masked_mean_loss(y, logits, mask) -> tf.Tensor:
    """The training loss of every implementation: mean NLL over unmasked tokens."""
    total, count = masked_nll(y, logits, mask)
    return total / tf.maximum(count, 1.0)


def make_sgd_step(model: tf.keras.Model, learning_rate: float):
    """A compiled plain-SGD step on the masked loss (the reference for the TFLite `train`)."""
    variables = [_slots(model)[name] for name in WEIGHT_NAMES]

    @tf.function
    def step(x, y, mask):
        with tf.GradientTape() as tape:
            loss = masked_mean_loss(y, model(x, training=True), mask)
        grads = tape.gradient(loss, variables)
        for var, grad in zip(variables, grads, strict=True):
            var.assign_sub(learning_rate * tf.convert_to_tensor(grad))
        return loss

    return step


def check_and_build(config: ModelConfig, weights: Weights | None) -> tf.keras.Model:
    return build_keras_model(config, check_weights(weights, config) if weights is not None else None)
