"""Weighted Federated Averaging as a streaming sum, and the server optimizer step.

FedAvg [McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", https://arxiv.org/abs/1602.05629] averages client updates weighted by their
example counts. Viewing the mean update as a pseudo-gradient and applying a server optimizer is
from Reddi et al., 2021, "Adaptive Federated Optimization" (https://arxiv.org/abs/2003.00295);
momentum on the server is FedAvgM [Hsu et al., 2019, https://arxiv.org/abs/1909.06335], Adam on
the server is FedAdam (Reddi et al., 2021).

Everything here is plain numpy on `{weight name: array}` dicts: no HTTP, no files, no wire types.
The sum is streamed, Σ nᵢ·Δᵢ and Σ nᵢ, so memory is O(model) whatever the number of clients.
Clipping wraps the sum and keeps its interface (`robust = ClippedSum(WeightedSum(...), C)`), as
TFF's `clipping_factory` wraps an inner aggregator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import numpy as np

from fedkb_core.clipping import global_norm, squared_norm

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
    """Running Σ nᵢ·Δᵢ (float64) and Σ nᵢ over updates with one fixed layout.

    The arrays of `weighted_sum` are views into one flat float64 vector, in the order of `shapes`
    (`layout` gives each name's offset and size), so an update stored as one float32 vector in
    that order can be added with `add_flat`: two numpy calls whatever the number of tensors.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.layout: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape in shapes.items():
            size = int(np.prod(shape, dtype=np.int64))
            self.layout[name] = (offset, size)
            offset += size
        self.flat = np.zeros(offset, np.float64)
        self.weighted_sum: Tensors = {name: self.flat[o: o + n].reshape(shapes[name])
                                      for name, (o, n) in self.layout.items()}
        self.total_examples = 0
        self.count = 0
        self._scratch = np.empty(offset, np.float64)

    @classmethod
    def restore(cls, weighted_sum: Mapping[str, np.ndarray], *, total_examples: int, count: int) -> "WeightedSum":
        """Rebuild a sum from a checkpoint of its arrays and counters."""
        out = cls({name: a.shape for name, a in weighted_sum.items()})
        for name, a in weighted_sum.items():
            out.weighted_sum[name][...] = a
        out.total_examples, out.count = int(total_examples), int(count)
        return out

    def add(self, deltas: Mapping[str, np.ndarray], num_examples: int, *, scale: float = 1.0) -> None:
        """Fold one update in place: Σ += n·s·Δ, in float64 so order barely matters.

        Args:
            scale: a factor applied to Δ on the way in (`ClippedSum` passes its clipping factor), in
                the same float64 multiply as n, so clipping costs no extra pass or copy.

        Raises:
            ValueError: num_examples is not positive, or the weight names differ from the sum's.
        """
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if deltas.keys() != self.weighted_sum.keys():
            raise ValueError(f"update has weights {sorted(deltas)}, the sum has {sorted(self.weighted_sum)}")
        factor = num_examples if scale == 1.0 else num_examples * float(scale)
        for name, acc in self.weighted_sum.items():
            # n·s·Δ goes through a float64 scratch buffer: no per-update allocation, no float32 rounding.
            scratch = self._scratch[: acc.size].reshape(acc.shape)
            np.multiply(deltas[name], factor, out=scratch, dtype=np.float64)
            acc += scratch
        self.total_examples += int(num_examples)
        self.count += 1

    def add_flat(self, values: np.ndarray, num_examples: int, *, scale: float = 1.0) -> None:
        """`add` for an update given as one 1-D vector laid out as `layout` (same result).

        Raises:
            ValueError: num_examples is not positive, or the vector's length is not the layout's.
        """
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if np.ndim(values) != 1 or np.size(values) != self.flat.size:
            raise ValueError(f"a flat update needs {self.flat.size} values, got shape {np.shape(values)}")
        factor = num_examples if scale == 1.0 else num_examples * float(scale)
        np.multiply(values, factor, out=self._scratch, dtype=np.float64)
        self.flat += self._scratch
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
    The factor min(1, C/‖Δ‖) of `fedkb_core.clipping.clip_by_global_norm` is applied inside the float64
    multiply of the inner sum instead of to a float32 copy of Δ (the same value up to float32
    rounding, which it avoids).
    """

    def __init__(self, inner: WeightedSum, clip_norm: float):
        """Raises: ValueError: clip_norm is not positive and finite."""
        if not (clip_norm > 0 and np.isfinite(clip_norm)):
            raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
        self.inner = inner
        self.clip_norm = float(clip_norm)

    def add(self, deltas: Mapping[str, np.ndarray], num_examples: int, *, norm: float | None = None) -> float:
        """Add min(1, C/‖Δ‖)·Δ with weight n; return ‖Δ‖.

        Args:
            norm: ‖Δ‖ if the caller measured it already on these very values; None: measure it.
        """
        if norm is None:
            norm = global_norm(deltas)
        self.inner.add(deltas, num_examples, scale=self.clip_norm / norm if norm > self.clip_norm else 1.0)
        return norm

    def add_flat(self, values: np.ndarray, num_examples: int) -> float:
        """`add` for an update given as one vector in the inner sum's `layout`; return ‖Δ‖.

        Raises:
            ValueError: a value is not finite (nothing is added), or as `WeightedSum.add_flat`.
        """
        norm = math.sqrt(squared_norm(values))
        if not math.isfinite(norm):
            raise ValueError("update has a value that is not finite")
        self.inner.add_flat(values, num_examples, scale=self.clip_norm / norm if norm > self.clip_norm else 1.0)
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


ADAM_STEP = "adam/step"  # optimizer-state key of Adam's step count (a 1-element tensor)


def adam_step(weights: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray], *, server_lr: float,
              beta1: float = 0.9, beta2: float = 0.99, epsilon: float = 1e-3,
              state: Mapping[str, np.ndarray] | None = None) -> ServerStep:
    """FedAdam: Adam on the pseudo-gradient g = −Δ̄, in TFF's `build_adam` form (bias-corrected).

    m ← m + (g − m)(1 − β₁);  s ← s + (g² − s)(1 − β₂);  t ← t + 1;
    w ← w − η·√(1 − β₂ᵗ)/(1 − β₁ᵗ) · m / (√s + ε).
    The defaults are Reddi et al.'s (β₂ = 0.99, ε = 10⁻³: a large ε keeps the first rounds, when s
    is tiny, from taking huge steps). Unlike SGD, the step size is about η per coordinate whatever
    the scale of Δ̄, which is what lets a few hundred rounds of small client updates make progress.

    Args:
        state: the previous step's `velocity` of the returned ServerStep (None: zeros, t = 0).

    Returns:
        The new weights, and in `velocity` the optimizer state: `m/<name>`, `s/<name>` and ADAM_STEP.
    """
    if weights.keys() != mean_delta.keys():
        raise ValueError(f"weights {sorted(weights)} and delta {sorted(mean_delta)} differ")
    step = (int(np.asarray(state[ADAM_STEP]).ravel()[0]) if state else 0) + 1
    rate = server_lr * np.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
    new_w, new_state = {}, {ADAM_STEP: np.array([step], np.float32)}
    for name, w in weights.items():
        g = -np.asarray(mean_delta[name], np.float64)
        if g.shape != np.shape(w):
            raise ValueError(f"{name}: delta shape {g.shape} differs from weight shape {np.shape(w)}")
        m = np.asarray(state[f"m/{name}"], np.float64) if state else np.zeros_like(g)
        v = np.asarray(state[f"s/{name}"], np.float64) if state else np.zeros_like(g)
        m = m + (g - m) * (1.0 - beta1)
        v = v + (g * g - v) * (1.0 - beta2)
        new_w[name] = (np.asarray(w, np.float64) - rate * m / (np.sqrt(v) + epsilon)).astype(np.float32)
        new_state[f"m/{name}"], new_state[f"s/{name}"] = m.astype(np.float32), v.astype(np.float32)
    return ServerStep(weights=new_w, velocity=new_state)
