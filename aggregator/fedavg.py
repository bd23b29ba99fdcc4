"""Weighted Federated Averaging as a streaming sum, and the server optimizer step.

FedAvg [McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", https://arxiv.org/abs/1602.05629] averages client updates weighted by their
example counts. Viewing the mean update as a pseudo-gradient and applying a server optimizer is
from Reddi et al., 2021, "Adaptive Federated Optimization" (https://arxiv.org/abs/2003.00295);
momentum on the server is FedAvgM [Hsu et al., 2019, https://arxiv.org/abs/1909.06335].

Everything here is plain numpy on `{weight name: array}` dicts: no HTTP, no files, no wire types.
The sum is streamed, Σ nᵢ·Δᵢ and Σ nᵢ, so memory is O(model) whatever the number of clients.
Clipping wraps the sum and keeps its interface (`robust = ClippedSum(WeightedSum(...), C)`), as
TFF's `clipping_factory` wraps an inner aggregator.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np

from fedkb.clipping import clip_by_global_norm

Tensors = dict[str, np.ndarray]


class EmptyAggregate(ValueError):
    """A mean was asked of a sum that holds no examples (Σ nᵢ = 0)."""


def aggregate(results: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> Tensors:
    """Compute the weighted average of (deltas, num_examples) pairs, all in memory.

    The reference the streaming `WeightedSum` is tested against; fine for a handful of updates.

    Raises:
        EmptyAggregate: the total number of examples is zero.
        ValueError: a pair has a different set of weight names than the first.
    """
    results = list(results)
    total = sum(int(n) for _, n in results)
    if total <= 0:
        raise EmptyAggregate("cannot average updates with no examples")
    names = list(results[0][0])
    out = {}
    for name in names:
        layers = [np.asarray(deltas[name], np.float64) * n for deltas, n in results]
        out[name] = (np.sum(layers, axis=0) / total).astype(np.float32)
    return out


class WeightedSum:
    """Running Σ nᵢ·Δᵢ (float64) and Σ nᵢ over updates with one fixed layout."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.weighted_sum: Tensors = {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}
        self.total_examples = 0
        self.count = 0
        self._scratch = np.empty(max((a.size for a in self.weighted_sum.values()), default=0), np.float64)

    @classmethod
    def restore(cls, weighted_sum: Mapping[str, np.ndarray], *, total_examples: int, count: int) -> "WeightedSum":
        """Rebuild a sum from a checkpoint of its arrays and counters."""
        out = cls({name: a.shape for name, a in weighted_sum.items()})
        for name, a in weighted_sum.items():
            out.weighted_sum[name][...] = a
        out.total_examples, out.count = int(total_examples), int(count)
        return out

    def add(self, deltas: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Fold one update in place: Σ += n·Δ, in float64 so order barely matters.

        Raises:
            ValueError: num_examples is not positive, or the weight names differ from the sum's.
        """
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if deltas.keys() != self.weighted_sum.keys():
            raise ValueError(f"update has weights {sorted(deltas)}, the sum has {sorted(self.weighted_sum)}")
        for name, acc in self.weighted_sum.items():
            # n·Δ goes through a float64 scratch buffer: no per-update allocation, no float32 rounding.
            scratch = self._scratch[: acc.size].reshape(acc.shape)
            np.multiply(deltas[name], num_examples, out=scratch, dtype=np.float64)
            acc += scratch
        self.total_examples += int(num_examples)
        self.count += 1

    def mean(self) -> Tensors:
        """Σ nᵢ·Δᵢ / Σ nᵢ as float32.

        Raises:
            EmptyAggregate: no update has been added.
        """
        if self.total_examples <= 0:
            raise EmptyAggregate("no updates were added to this round's sum")
        return {name: (acc / self.total_examples).astype(np.float32) for name, acc in self.weighted_sum.items()}


class ClippedSum:
    """Wraps a sum so each update is first scaled to global L2 norm ≤ clip_norm.

    Same `add`/`mean` interface as the inner sum; `add` also returns the norm measured before
    clipping, which the server records. Clipping bounds one device's influence whatever it sends.
    """

    def __init__(self, inner: WeightedSum, clip_norm: float):
        """Raises: ValueError: clip_norm is not positive and finite."""
        if not (clip_norm > 0 and np.isfinite(clip_norm)):
            raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
        self.inner = inner
        self.clip_norm = float(clip_norm)

    def add(self, deltas: Mapping[str, np.ndarray], num_examples: int) -> float:
        clipped, norm = clip_by_global_norm(dict(deltas), self.clip_norm)
        self.inner.add(clipped, num_examples)
        return norm

    def mean(self) -> Tensors:
        return self.inner.mean()


@dataclasses.dataclass(frozen=True)
class ServerStep:
    """The server optimizer's result: new global weights and its momentum buffer."""

    weights: Tensors
    velocity: Tensors


def server_step(weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray], *, server_lr: float = 1.0,
                momentum: float = 0.0, velocity: Mapping[str, np.ndarray] | None = None) -> ServerStep:
    """Apply SGD (with optional momentum) to the mean delta, which points downhill already.

    v ← momentum·v + Δ̄ ;  w ← w + server_lr·v. With server_lr = 1 and momentum = 0 this is plain
    FedAvg: the new weights are the example-weighted mean of the clients' local weights.

    Args:
        weights: current global weights (float32).
        mean_delta: the weighted mean update Δ̄ (local − global).
        server_lr: server learning rate η.
        momentum: β in [0, 1).
        velocity: the previous round's v (None: zeros).

    Raises:
        ValueError: mismatched weight names or shapes.
    """
    if weights.keys() != mean_delta.keys():
        raise ValueError(f"weights {sorted(weights)} and delta {sorted(mean_delta)} differ")
    new_w, new_v = {}, {}
    for name, w in weights.items():
        d = np.asarray(mean_delta[name], np.float64)
        if d.shape != np.shape(w):
            raise ValueError(f"{name}: delta shape {d.shape} differs from weight shape {np.shape(w)}")
        v = d if velocity is None or momentum == 0.0 else momentum * np.asarray(velocity[name], np.float64) + d
        new_w[name] = (np.asarray(w, np.float64) + server_lr * v).astype(np.float32)
        new_v[name] = v.astype(np.float32)
    return ServerStep(weights=new_w, velocity=new_v)
