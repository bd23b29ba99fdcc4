"""The same LSTM language model in plain numpy: the TF-free reference for evaluation.

Evaluating every model the same way (the Keras baseline, each federated version, the TFF
reference) needs a forward pass that depends on nothing but the weights. Matches the Keras
model and the TFLite models to float tolerance (tested).
"""

from __future__ import annotations

import numpy as np

from model.weights import Weights


def _sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # overflow-free


def cell(w: Weights, z: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, f, g, o = np.split(z, 4, axis=-1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c


def forward(w: Weights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits [N, T, V] and the states h, c [N, T, H] after each position, from zero state."""
    n, t = x.shape
    h_units = w["lstm_recurrent_kernel"].shape[0]
    gates_in = w["embedding"][x] @ w["lstm_kernel"] + w["lstm_bias"]  # [N, T, 4H]
    h = np.zeros((n, h_units), np.float32)
    c = np.zeros((n, h_units), np.float32)
    hs = np.empty((n, t, h_units), np.float32)
    cs = np.empty((n, t, h_units), np.float32)
    for step in range(t):
        h, c = cell(w, gates_in[:, step] + h @ w["lstm_recurrent_kernel"], c)
        hs[:, step], cs[:, step] = h, c
    return output_logits(w, hs), hs, cs


def output_logits(w: Weights, h: np.ndarray) -> np.ndarray:
    projected = h @ w["projection_kernel"] + w["projection_bias"]
    return projected @ w["embedding"].T + w["output_bias"]


def step(w: Weights, token: int, state: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, tuple]:
    """Feed one token; return (logits [V] for the next piece, new state)."""
    h, c = state
    z = w["embedding"][token] @ w["lstm_kernel"] + w["lstm_bias"] + h @ w["lstm_recurrent_kernel"]
    h, c = cell(w, z, c)
    return output_logits(w, h), (h, c)
