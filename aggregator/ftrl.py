"""DP-FTRL with momentum: the server step that trains on tree-noised prefix sums.

Kairouz et al., 2021, "Practical and Private (Deep) Learning without Sampling or Shuffling"
(https://arxiv.org/abs/2103.00039), Algorithm 1 with momentum (DP-FTRLM), as in the authors'
`DPFTRLMServerOptimizer`: the model is always the anchor θ₀ (the model when the current tree
started) moved along a momentum of the *noised prefix sums* s_t of the mean updates,
    v_t = γ·v_{t−1} + s_t ;   θ_{t+1} = θ₀ + η·v_t,
rather than the previous model moved by the latest noised update. With γ = 0 it is SGD with
rate η on the noised updates; in general, since v_t − v_{t−1} = γ·(v_{t−1} − v_{t−2}) + (s_t − s_{t−1}),
it equals server SGD with momentum on the tree's *residuals* s_t − s_{t−1}, which is how TFF builds
it (`DifferentiallyPrivateFactory.tree_aggregation` + `build_sgdm`) and how the tests check it.
Updates are fedkb deltas (trained − global, pointing downhill), so the sign is +η.

A restart (`TreeConfig.restart_period`) re-anchors at the current model and zeroes the momentum,
as the reference `restart_dp_tree` does; the next tree's noise is independent of the last's.

The noise is added to the *sum* of clipped updates, then divided by a fixed denominator (the
round's goal count), as TFF's `NormalizedQuery` does: dividing by the actual number of updates
would make the sensitivity data-dependent.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from aggregator.tree_aggregation import TreeAggregator, TreeConfig, TreeState


@dataclasses.dataclass(frozen=True)
class FtrlConfig:
    """learning_rate: η; momentum: γ in [0, 1); denominator: the fixed cohort size the sums are
    divided by (the round's goal count)."""

    learning_rate: float
    momentum: float = 0.0
    denominator: float = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0.0:
            raise ValueError(f"FTRL learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"FTRL momentum must be in [0, 1), got {self.momentum}")
        if not self.denominator > 0.0:
            raise ValueError(f"FTRL denominator must be positive, got {self.denominator}")


@dataclasses.dataclass(frozen=True)
class FtrlState:
    """anchor: θ₀ of the current tree; momentum_buffer: v_{t−1} (zeros at a tree's start)."""

    anchor: np.ndarray
    momentum_buffer: np.ndarray

    @classmethod
    def anchored_at(cls, weights: np.ndarray) -> "FtrlState":
        weights = np.asarray(weights, np.float64)
        return cls(anchor=weights.copy(), momentum_buffer=np.zeros_like(weights))


def ftrl_step(state: FtrlState, noised_prefix_mean: np.ndarray, config: FtrlConfig) -> tuple[np.ndarray, FtrlState]:
    """One FTRL-with-momentum step: (new weights, new state). Pure."""
    v = config.momentum * state.momentum_buffer + np.asarray(noised_prefix_mean, np.float64)
    return state.anchor + config.learning_rate * v, dataclasses.replace(state, momentum_buffer=v)


class DpFtrl:
    """The whole server side of DP-FTRL for one flat weight vector: tree noise + FTRL + restarts.

    `round(clipped_sum)` takes the round's sum of clipped updates (each of norm ≤ C) and returns
    the next model. What must be persisted after each round, together with the model it
    produced and before that model is published: `tree.state` (small, JSON), `tree.running_sum`
    and `ftrl` (three model-size vectors). Replaying a round from that persisted state gives the
    same noise, so a crash can never cause two independently noised releases of one round.
    """

    def __init__(self, tree_config: TreeConfig, ftrl_config: FtrlConfig, weights: np.ndarray, *,
                 tree_state: TreeState | None = None, running_sum: np.ndarray | None = None,
                 ftrl_state: FtrlState | None = None, node_noise_for=None):
        weights = np.asarray(weights, np.float64)
        self.ftrl_config = ftrl_config
        self.tree = TreeAggregator(tree_config, weights.size, tree_state or TreeState.fresh(), running_sum,
                                   node_noise_for=node_noise_for)
        self.ftrl = ftrl_state or FtrlState.anchored_at(weights)

    def round(self, clipped_sum: np.ndarray) -> np.ndarray:
        noised_prefix, restarted = self.tree.release(clipped_sum)
        weights, self.ftrl = ftrl_step(self.ftrl, noised_prefix / self.ftrl_config.denominator, self.ftrl_config)
        if restarted:
            self.ftrl = FtrlState.anchored_at(weights)
        return weights
