"""Binary-tree noise for releasing every prefix sum of a stream, re-derivable from one seed.

Tree aggregation [Dwork et al., 2010, "Differential Privacy under Continual Observation";
Chan et al., 2011] lets a server release the cumulative sum S_t = x_0 + … + x_t after every round
while each x_i touches only the ⌈log₂⌉ tree nodes above leaf i: every node of the binary tree over
the rounds holds one Gaussian draw, and the noise on S_t is the sum of the nodes whose dyadic
intervals tile [0, t], popcount(t + 1) of them. DP-FTRL [Kairouz et al., 2021, "Practical and
Private (Deep) Learning without Sampling or Shuffling", https://arxiv.org/abs/2103.00039] trains
on these noised prefix sums.

A node is named by (level L, position j) and covers rounds [j·2^L, (j+1)·2^L − 1]. Its draw comes
from a generator keyed by (seed, tree, L, j) and nothing else, so the state worth keeping is three
integers (`TreeState`): after a server restart the same releases get the same noise without
anything new being drawn. Two releases of one round with independent noise would average the
noise away; re-deriving from the seed rules that out by construction.

`efficient=True` is Honaker's estimator [Honaker, 2015, "Efficient Use of Differentially Private
Binary Trees"], as tensorflow_privacy's `EfficientTreeAggregator`: a node's value is its own draw
plus half the sum of its two children's values, V = Z + (V_left + V_right)/2, weighted by
1/(2 − 2^−L) when released. Same privacy, variance σ²·Σ 1/(2 − 2^−L) over the covering levels
instead of σ²·popcount(t + 1).

Everything here is numpy on flat float vectors; the noise is of the *sum* (standard deviation
z·C per node for updates clipped to C), before any division by a cohort size.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Callable

import numpy as np

NodeNoise = Callable[[int, int], np.ndarray]  # (level, position) -> one node's draw


def covering_nodes(step: int) -> list[tuple[int, int]]:
    """The dyadic nodes (level, position) whose intervals tile rounds [0, step], largest first.

    One node per set bit of step + 1 (the Fenwick decomposition of the prefix).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    count, start, nodes = step + 1, 0, []
    for level in range(count.bit_length() - 1, -1, -1):
        if count >> level & 1:
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


def cumulative_noise_variance(step: int, stddev: float, *, efficient: bool = False) -> float:
    """Per-coordinate variance of the noise on the prefix sum released at `step` (the theory)."""
    levels = [level for level, _ in covering_nodes(step)]
    if efficient:
        return stddev ** 2 * sum(1.0 / (2.0 - 0.5 ** level) for level in levels)
    return stddev ** 2 * len(levels)


def new_seed() -> int:
    """A 128-bit seed from the OS's CSPRNG: the only secret the tree's noise depends on."""
    return secrets.randbits(128)


def seeded_node_noise(seed: int, tree_index: int, size: int, stddev: float) -> NodeNoise:
    """Gaussian node draws, each from its own generator keyed by (seed, tree, level, position)."""

    def draw(level: int, position: int) -> np.ndarray:
        if stddev == 0.0:
            return np.zeros(size)
        key = np.random.SeedSequence(entropy=seed, spawn_key=(tree_index, level, position))
        return np.random.default_rng(key).standard_normal(size) * stddev

    return draw


class TreeNoise:
    """The cumulative noise of one tree, computed from its node draws on demand.

    Only the values of the current covering nodes are cached (at most ⌈log₂ T⌉ vectors), so the
    next release costs O(log T) draws in the efficient variant and at most one new draw plus the
    cache hits in the plain one. A fresh object for the same (seed, tree) rebuilds the cache from
    the seed and gives identical values.
    """

    def __init__(self, node_noise: NodeNoise, *, efficient: bool = False):
        self._draw = node_noise
        self._efficient = efficient
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _value(self, level: int, position: int) -> np.ndarray:
        node = (level, position)
        if node not in self._cache:
            value = np.asarray(self._draw(level, position), np.float64)
            if self._efficient and level > 0:
                value = value + 0.5 * (self._value(level - 1, 2 * position) + self._value(level - 1, 2 * position + 1))
            self._cache[node] = value
        return self._cache[node]

    def cumulative(self, step: int) -> np.ndarray:
        """Noise on the sum of rounds 0..step of this tree."""
        nodes = covering_nodes(step)
        total = None
        for level, position in nodes:
            value = self._value(level, position)
            if self._efficient:
                value = value / (2.0 - 0.5 ** level)
            total = value.copy() if total is None else total + value
        self._cache = {node: self._cache[node] for node in nodes}
        return total


@dataclasses.dataclass(frozen=True)
class TreeConfig:
    """How the tree is noised and when it restarts.

    stddev: per-node standard deviation on the sum (noise multiplier z times clip norm C).
    restart_period / restart_warmup: as tensorflow_privacy's `PeriodicRoundRestartIndicator`,
    the tree restarts after release number k (counted from 1 over all trees) when
    k mod period == warmup; None = never. A restart bounds the tree's depth (and the noise's
    growth) and lets the server re-anchor FTRL at the current model.
    """

    stddev: float
    efficient: bool = False
    restart_period: int | None = None
    restart_warmup: int = 0

    def __post_init__(self):
        if not self.stddev >= 0.0:
            raise ValueError(f"tree stddev must be >= 0, got {self.stddev}")
        if self.restart_period is not None:
            if self.restart_period < 1:
                raise ValueError(f"restart_period must be >= 1, got {self.restart_period}")
            if self.restart_warmup and not 0 < self.restart_warmup < self.restart_period:
                raise ValueError(
                    f"restart_warmup must be in [1, {self.restart_period - 1}], got {self.restart_warmup}")
        elif self.restart_warmup:
            raise ValueError("restart_warmup needs a restart_period")

    def restarts_after(self, releases: int) -> bool:
        """Whether the tree restarts once `releases` releases (over all trees) have been made."""
        return self.restart_period is not None and releases % self.restart_period == self.restart_warmup


@dataclasses.dataclass(frozen=True)
class TreeState:
    """Everything the tree's noise depends on besides its config: small and JSON-able.

    seed: the secret; tree_index: how many restarts so far; step: the leaf the next release
    fills in the current tree; releases: releases made over all trees (drives the restarts).
    """

    seed: int
    tree_index: int = 0
    step: int = 0
    releases: int = 0

    @classmethod
    def fresh(cls) -> "TreeState":
        return cls(seed=new_seed())

    def to_json(self) -> dict:
        return {"seed": format(self.seed, "032x"), "tree_index": self.tree_index, "step": self.step,
                "releases": self.releases}

    @classmethod
    def from_json(cls, data: dict) -> "TreeState":
        try:
            state = cls(seed=int(data["seed"], 16), tree_index=int(data["tree_index"]), step=int(data["step"]),
                        releases=int(data["releases"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a tree state: {exc}") from exc
        if min(state.seed, state.tree_index, state.step, state.releases) < 0:
            raise ValueError(f"tree state fields must be >= 0: {data}")
        return state

    def advanced(self, config: TreeConfig) -> tuple["TreeState", bool]:
        """The state after releasing leaf `step`, and whether the tree restarted."""
        releases = self.releases + 1
        if config.restarts_after(releases):
            return dataclasses.replace(self, tree_index=self.tree_index + 1, step=0, releases=releases), True
        return dataclasses.replace(self, step=self.step + 1, releases=releases), False


class TreeAggregator:
    """Noised prefix sums of a stream over restarting trees; the release is S_t + noise_t.

    Holds the noiseless running sum of the current tree (private to the server) and a
    `TreeNoise` for the current tree; `state` is what must be persisted with each release.
    """

    def __init__(self, config: TreeConfig, size: int, state: TreeState,
                 running_sum: np.ndarray | None = None,
                 node_noise_for: Callable[[TreeState], NodeNoise] | None = None):
        self.config, self.size, self.state = config, size, state
        self.running_sum = np.zeros(size) if running_sum is None else np.asarray(running_sum, np.float64)
        if self.running_sum.shape != (size,):
            raise ValueError(f"running sum has shape {self.running_sum.shape}, expected ({size},)")
        self._node_noise_for = node_noise_for or (
            lambda s: seeded_node_noise(s.seed, s.tree_index, size, config.stddev))
        self._noise = self._tree_noise()

    def _tree_noise(self) -> TreeNoise:
        return TreeNoise(self._node_noise_for(self.state), efficient=self.config.efficient)

    def release(self, round_sum: np.ndarray) -> tuple[np.ndarray, bool]:
        """Add one round's sum, return (noised prefix sum of the current tree, restarted after it).

        After a restart the next release is the prefix sum of the new tree only, starting from zero.
        """
        round_sum = np.asarray(round_sum, np.float64)
        if round_sum.shape != (self.size,):
            raise ValueError(f"round sum has shape {round_sum.shape}, expected ({self.size},)")
        self.running_sum = self.running_sum + round_sum
        released = self.running_sum + self._noise.cumulative(self.state.step)
        self.state, restarted = self.state.advanced(self.config)
        if restarted:
            self.running_sum = np.zeros(self.size)
            self._noise = self._tree_noise()
        return released, restarted
