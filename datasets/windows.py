"""Fixed-shape [B, T] training windows over a client's token stream.

The trainable TFLite model has static shapes, so every batch is exactly [B, T]: streams are cut
into windows of T inputs and T next-token targets, and short windows or batches are padded with
id 0 under a zero mask. Targets that are BOS (the start of the next utterance) are masked too:
nothing predicts that a new message starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from datasets.tokenizer import BOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True)
class Windows:
    """Inputs x, targets y (x shifted by one) and a float mask, each [N, T]."""

    x: np.ndarray  # int32 [N, T]
    y: np.ndarray  # int32 [N, T]
    mask: np.ndarray  # float32 [N, T]; 0 where y is padding or BOS

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def take(self, index) -> "Windows":
        return Windows(self.x[index], self.y[index], self.mask[index])


def empty_windows(seq_len: int) -> Windows:
    return Windows(
        np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.float32)
    )


def make_windows(tokens: np.ndarray, seq_len: int) -> Windows:
    """Cut a token stream into non-overlapping windows of `seq_len` (last one padded)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    tokens = np.asarray(tokens, dtype=np.int32)
    n_targets = len(tokens) - 1
    if n_targets < 1:
        return empty_windows(seq_len)
    n = -(-n_targets // seq_len)
    padded = np.full(n * seq_len + 1, PAD_ID, dtype=np.int32)
    padded[: len(tokens)] = tokens
    x = padded[:-1].reshape(n, seq_len)
    y = padded[1:].reshape(n, seq_len)
    valid = np.zeros(n * seq_len, dtype=bool)
    valid[:n_targets] = True
    mask = (valid.reshape(n, seq_len) & (y != BOS_ID) & (y != PAD_ID)).astype(np.float32)
    return Windows(x.copy(), y.copy(), mask)


def concat_windows(parts: list[Windows]) -> Windows:
    """Stack windows from several clients (all with the same T)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("no windows to concatenate")
    return Windows(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.mask for p in parts]),
    )


def pad_to_batch(windows: Windows, batch_size: int) -> Windows:
    """Pad with zero-mask rows up to exactly batch_size rows."""
    n = len(windows)
    if n > batch_size:
        raise ValueError(f"{n} windows do not fit a batch of {batch_size}")
    if n == batch_size:
        return windows
    pad = batch_size - n
    t = windows.x.shape[1]
    return Windows(
        np.concatenate([windows.x, np.zeros((pad, t), np.int32)]),
        np.concatenate([windows.y, np.zeros((pad, t), np.int32)]),
        np.concatenate([windows.mask, np.zeros((pad, t), np.float32)]),
    )


def iterate_batches(windows: Windows, *, batch_size: int, seed: int, epochs: int = 1,
                    shuffle: bool = True) -> Iterator[Windows]:
    """Yield batches of exactly `batch_size` rows; the same seed gives the same order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng(seed)
    n = len(windows)
    for _ in range(epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            yield pad_to_batch(windows.take(order[start : start + batch_size]), batch_size)
