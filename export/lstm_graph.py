"""The LSTM language model written so that TFLite's builtin ops can train it.

LiteRT's pip runtime has no Flex delegate, so every op of the forward pass *and of its
gradient* must be a TFLite builtin. What that takes (each found by converting and failing):
a hand-unrolled recurrence over a static T (`tf.unstack`, no TensorList or while loop);
sigmoid and tanh with gradients written in plain mul/sub (the stock SigmoidGrad/TanhGrad are not
builtins); cross-entropy as log-sum-exp minus the target logit picked by a one-hot product;
`tf.gather` for the embedding (its gradient converts). The input projection of all T steps is
one batched matmul before the recurrence, which is most of the speed.
"""

from __future__ import annotations

import tensorflow as tf


@tf.custom_gradient
def sigmoid(x):
    y = tf.math.sigmoid(x)

    def grad(dy):
        return dy * y * (1.0 - y)

    return y, grad


@tf.custom_gradient
def tanh(x):
    y = tf.math.tanh(x)

    def grad(dy):
        return dy * (1.0 - y * y)

    return y, grad


def lstm_cell(z, c):
    """One step given the summed gate pre-activations z [B, 4H] (Keras gate order i, f, c, o)."""
    i, f, g, o = tf.split(z, 4, axis=1)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h = sigmoid(o) * tanh(c)
    return h, c


def sequence_logits(w: dict, x, *, batch_size: int, seq_len: int, embed_dim: int, lstm_units: int):
    """Logits [B*T, V] for token ids x [B, T], from zero initial state."""
    B, T, E, H = batch_size, seq_len, embed_dim, lstm_units
    emb = tf.gather(w["embedding"], x)  # [B, T, E]
    gates_in = tf.matmul(tf.reshape(emb, [B * T, E]), w["lstm_kernel"]) + w["lstm_bias"]
    gates_in = tf.unstack(tf.reshape(gates_in, [B, T, 4 * H]), axis=1)  # T × [B, 4H]
    h = tf.zeros([B, H])
    c = tf.zeros([B, H])
    outputs = []
    for z in gates_in:
        h, c = lstm_cell(z + tf.matmul(h, w["lstm_recurrent_kernel"]), c)
        outputs.append(h)
    hs = tf.reshape(tf.stack(outputs, axis=1), [B * T, H])
    projected = tf.matmul(hs, w["projection_kernel"]) + w["projection_bias"]
    return tf.matmul(projected, w["embedding"], transpose_b=True) + w["output_bias"]


def token_nll(logits, y, vocab_size: int):
    """Per-token negative log-likelihood [N] of targets y (any shape with N elements)."""
    peak = tf.reduce_max(tf.stop_gradient(logits), axis=1, keepdims=True)
    log_sum_exp = tf.math.log(tf.reduce_sum(tf.exp(logits - peak), axis=1)) + tf.squeeze(peak, 1)
    target = tf.reduce_sum(tf.one_hot(tf.reshape(y, [-1]), vocab_size) * logits, axis=1)
    return log_sum_exp - target
