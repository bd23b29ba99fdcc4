"""A DP-FTRL round's release on the server: the parent's weights and state and the round's clipped
sum in; the next weights and the state the next round needs out. Plain numpy, no I/O.

The state is tensors, so it travels in the version folder's optimizer file as the server
momentum does (written atomically with the version, read back from the parent): `dp_ftrl/anchor/`
and `dp_ftrl/momentum/` per weight, `dp_ftrl/sum/` (the tree's noiseless running sum) and
`dp_ftrl/tree`, the counters (tree index, leaf, releases). The tree's seed is not in it: it stays
in the database (`dp_tree_seeds`), which /v1/status never shows. A release is therefore a pure
function of (parent version, round sum, seed), all durable before it is computed: a crash before
the version is recorded recomputes the same noise, never a fresh draw.
"""

from __future__ import annotations

import numpy as np

from aggregator.fedavg import Tensors
from aggregator.ftrl import DpFtrl, FtrlConfig, FtrlState
from aggregator.tree_aggregation import TreeConfig, TreeState

PREFIX = "dp_ftrl/"
_TREE = PREFIX + "tree"


def _flat(tensors, names) -> np.ndarray:
    return np.concatenate([np.asarray(tensors[n], np.float64).ravel() for n in names])


def _unflat(vector: np.ndarray, like: Tensors, names, dtype) -> Tensors:
    out, at = {}, 0
    for n in names:
        size = int(np.prod(like[n].shape))
        out[n] = vector[at:at + size].reshape(like[n].shape).astype(dtype)
        at += size
    return out


def has_state(state: Tensors | None) -> bool:
    """Whether the parent version carries DP-FTRL state (else this release starts a first tree)."""
    return state is not None and _TREE in state


def tree_index(state: Tensors | None) -> int:
    """The index of the tree the next release goes into (0 for a first release)."""
    return int(state[_TREE][0]) if has_state(state) else 0


def release(weights: Tensors, clipped_sum: Tensors, state: Tensors | None, seed: int, *,
            noise_multiplier: float, clip_norm: float, denominator: int, learning_rate: float, momentum: float,
            restart_period: int | None) -> tuple[Tensors, Tensors, TreeState]:
    """(new weights, the state to publish with them, the tree's state after this release).

    `seed` is the seed of tree `tree_index(state)`; the tree's node noise has stddev Z·C on the sum.
    """
    names = sorted(weights)
    w = _flat(weights, names)

    def part(kind):
        return _flat({n: state[PREFIX + kind + "/" + n] for n in names}, names)

    if has_state(state):
        index, step, releases = (int(v) for v in state[_TREE])
        restored = dict(tree_state=TreeState(seed, index, step, releases), running_sum=part("sum"),
                        ftrl_state=FtrlState(part("anchor"), part("momentum")))
    else:
        restored = dict(tree_state=TreeState(seed))
    ftrl = DpFtrl(TreeConfig(noise_multiplier * clip_norm, efficient=True, restart_period=restart_period),
                  FtrlConfig(learning_rate, momentum, float(denominator)), w, **restored)
    new_weights = ftrl.round(_flat(clipped_sum, names))
    tree = ftrl.tree.state
    out = {}
    for kind, vector in (("anchor", ftrl.ftrl.anchor), ("momentum", ftrl.ftrl.momentum_buffer),
                         ("sum", ftrl.tree.running_sum)):
        out.update({PREFIX + kind + "/" + n: v for n, v in _unflat(vector, weights, names, np.float64).items()})
    out[_TREE] = np.array([tree.tree_index, tree.step, tree.releases], np.int64)
    return _unflat(new_weights, weights, names, np.float32), out, tree
