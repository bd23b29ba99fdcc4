"""The round, device and server-optimizer settings, defined once for `fedkb serve` and `fedkb simulate`.

The defaults are the settings the README's quality results were measured with (FedAdam at server
learning rate 0.03, on-device SGD at 1.0 on at most 64 windows, 20 updates per round): an operator
who runs `fedkb serve` with no flags runs what `fedkb simulate` measured. The server's
`AggregatorConfig` extends this class (so its config-file keys and `FEDKB_*` variables keep these
names); the fleet's `FleetConfig` and both commands' flags take their defaults from `TRAINING`.
"""

from __future__ import annotations

import dataclasses
import math

from fedkb_core.secagg import graph, integer_encoding
from fedkb_core.update_encoding import (DEFAULT_BITS, HADAMARD, SECAGG, SECAGG_DEFAULT_BITS, SECAGG_DP_DEFAULT_BITS,
                                        UpdateEncoding)

# The server learning rate when none is given, by optimizer: FedAdam's measured 0.03 (Reddi et al.,
# 2021), and 1.0 for SGD, which without momentum is plain FedAvg.
SERVER_LR = {"adam": 0.03, "sgd": 1.0}


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What a round aggregates, what a task asks of a device, and how the server steps."""

    # Rounds. Over-selection assigns ~30% more devices than the goal, as production systems do
    # against dropout (Bonawitz et al., 2019, "Towards Federated Learning at Scale").
    goal_clients: int = 20
    min_clients: int | None = None  # None: half the goal (at least 1)
    over_selection: float = 1.3

    # Aggregation: every update is clipped to clip_norm (on the device and again on the server),
    # then the server optimizer steps along the weighted mean delta.
    clip_norm: float = 1.0
    server_optimizer: str = "adam"  # adam (FedAdam) or sgd (FedAvg; FedAvgM with momentum)
    server_lr: float | None = None  # None: SERVER_LR[server_optimizer]
    server_momentum: float = 0.0  # > 0 is FedAvgM (Hsu et al., 2019); sgd only
    server_beta1: float = 0.9  # adam only
    server_beta2: float = 0.99  # adam only
    server_epsilon: float = 1e-3  # adam only

    # What a task asks of a device. One example is one training window of the model's seq_len.
    device_lr: float = 1.0
    device_epochs: int = 1
    device_max_examples: int = 64

    # How devices upload (docs/architecture.md, "Compressed updates"): float32 (exact), float16, or
    # hadamard: a randomized Hadamard rotation with a per-round seed, then unbiased stochastic
    # rounding to update_bits (1..8; None: 8) bits per coordinate.
    update_encoding: str = "float32"
    update_bits: int | None = None

    # User-level differential privacy (issue 14; docs/architecture.md, "Differential privacy").
    # DP-FedAvg (McMahan et al., 2018) is on when dp_noise_multiplier (Z) is set: every update
    # clipped to clip_norm, an unweighted sum over a fixed denominator (goal_clients) and Gaussian
    # noise of standard deviation Z x clip_norm added once per round.
    dp_noise_multiplier: float | None = None  # Z; None: DP off
    # Adaptive clipping (Andrew et al., 2021): clip_norm moves geometrically towards the
    # dp_target_quantile of the update norms, from a clipped count noised with
    # dp_clipped_count_stddev (sigma_b; None: goal_clients / 20).
    dp_adaptive_clipping: bool = False
    dp_target_quantile: float = 0.5
    dp_clip_learning_rate: float = 0.2
    dp_clipped_count_stddev: float | None = None
    # The mechanism: "fedavg" (independent noise per round) or "ftrl": DP-FTRL (Kairouz et al., 2021),
    # tree-aggregation noise on the prefix sums of the rounds' clipped sums and FTRL with momentum
    # on the server (server_optimizer sgd: server_lr and server_momentum). The tree restarts every
    # dp_tree_restart_period releases (None: never); a device contributes to two releases only
    # with at least dp_min_separation other releases in between (enforced at check-in).
    dp_mechanism: str = "fedavg"
    dp_min_separation: int = 0
    dp_tree_restart_period: int | None = None
    # Accounting: the population N (devices that may ever take part), the delta (None: 1 / N**1.1)
    # and a budget: no round opens whose release would push epsilon past dp_target_epsilon.
    dp_population: int | None = None
    dp_delta: float | None = None
    dp_target_epsilon: float | None = None

    # Secure aggregation (docs/secure_aggregation.md): every round runs SecAgg+, so the server sums
    # masked integer vectors and never sees one device's update. It sets update_encoding to secagg.
    # Without DP the grid is tuned (`secagg_tuned`): update_bits (2..24, default 8) bits per masked
    # value, steps that make the sum fit; with DP it is fixed: update_bits is the grid's b (default
    # 12) and a masked value has b + ceil(log2 cohort) bits. A device may lose secagg_tolerated_dropout of its neighbours
    # (graph.thresholds); secagg_degree is the neighbour count k (None: graph.default_degree); a
    # stage waits secagg_stage_timeout seconds for its devices (None: the task report window).
    secure_aggregation: bool = False
    secagg_tolerated_dropout: float = 0.2
    secagg_degree: int | None = None
    secagg_stage_timeout: float | None = None

    def __post_init__(self):
        if self.min_clients is None and isinstance(self.goal_clients, int):
            object.__setattr__(self, "min_clients", max(1, self.goal_clients // 2))
        if self.server_lr is None and self.server_optimizer in SERVER_LR:
            object.__setattr__(self, "server_lr", SERVER_LR[self.server_optimizer])
        if self.secure_aggregation is True and self.update_encoding == "float32":  # the default: SecAgg's own
            object.__setattr__(self, "update_encoding", SECAGG)
        if self.update_bits is None and self.update_encoding == HADAMARD:
            object.__setattr__(self, "update_bits", DEFAULT_BITS)
        if self.update_bits is None and self.update_encoding == SECAGG:
            object.__setattr__(self, "update_bits", SECAGG_DP_DEFAULT_BITS if self.dp_enabled else SECAGG_DEFAULT_BITS)

    @property
    def max_assigned(self) -> int:
        """How many devices one round hands tasks to: ceil(goal × over-selection) (a SecAgg round's
        cohort bound m: its modulus must hold the sum of m vectors)."""
        return math.ceil(self.goal_clients * self.over_selection - 1e-9)

    def training_problems(self) -> list[str]:
        """What is out of range, one message per setting (empty when valid)."""
        problems = []
        if self.min_clients is not None and self.min_clients < 1:
            problems.append(f"min_clients must be >= 1, got {self.min_clients}")
        if self.min_clients is not None and self.goal_clients < self.min_clients:
            problems.append(f"goal_clients ({self.goal_clients}) must be >= min_clients ({self.min_clients})")
        if not self.over_selection >= 1.0:
            problems.append(f"over_selection must be >= 1.0, got {self.over_selection}")
        if self.server_optimizer not in SERVER_LR:
            problems.append(f"server_optimizer must be sgd or adam, got {self.server_optimizer!r}")
        for name in ("clip_norm", "server_lr", "device_lr"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number, got {value}")
        for name in ("server_beta1", "server_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.server_epsilon > 0.0:
            problems.append(f"server_epsilon must be positive, got {self.server_epsilon}")
        if not 0.0 <= self.server_momentum < 1.0:
            problems.append(f"server_momentum must be in [0, 1), got {self.server_momentum}")
        if self.server_momentum and self.server_optimizer != "sgd":
            problems.append("server_momentum applies to server_optimizer sgd (FedAvgM) only")
        if self.device_epochs < 1 or self.device_max_examples < 1:
            problems.append("device_epochs and device_max_examples must be >= 1")
        problems += UpdateEncoding(self.update_encoding, self.update_bits).problems(needs_seed=False)
        return problems + self.privacy_problems() + self.secagg_problems()

    def secagg_problems(self) -> list[str]:
        """What secure aggregation cannot honour, one message each (empty when valid or off)."""
        if not self.secure_aggregation:
            if self.update_encoding == SECAGG:
                return [f"update_encoding {SECAGG} is chosen by secure_aggregation (--secure-aggregation), "
                        "not by itself"]
            return []
        problems = []
        if self.update_encoding != SECAGG:
            problems.append(f"secure_aggregation uploads in the {SECAGG} encoding: update_encoding "
                            f"{self.update_encoding!r} cannot be used with it (leave --update-encoding at its default)")
        if self.min_clients is not None and self.min_clients < 2:
            problems.append(f"secure_aggregation needs min_clients >= 2 (the sum of one device is its update), "
                            f"got {self.min_clients}")
        dropout = self.secagg_tolerated_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 0.5:
            problems.append(f"secagg_tolerated_dropout must be a fraction in [0, 0.5), got {dropout!r}")
            dropout = None
        degree = self.secagg_degree
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 1):
            problems.append(f"secagg_degree must be an integer >= 1, got {degree!r}")
            degree = None
        timeout = self.secagg_stage_timeout
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            problems.append(f"secagg_stage_timeout must be a positive number of seconds, got {timeout!r}")
        bits = self.update_bits
        if self.update_encoding == SECAGG and isinstance(bits, int) and integer_encoding.MIN_BITS <= bits <= \
                integer_encoding.MAX_BITS and self.max_assigned >= 1:
            try:
                if self.secagg_tuned:
                    integer_encoding.tuned_steps(bits, self.max_assigned, 1.0, 1)
                else:
                    integer_encoding.modulus_bits(bits, self.max_assigned)
            except ValueError as err:
                rule = ("" if self.secagg_tuned else
                        "; with DP the grid is fixed: r = update_bits + ceil(log2 cohort) must be <= 32")
                problems.append(f"secure_aggregation: {err} (the cohort is goal_clients x over_selection = "
                                f"{self.max_assigned} devices{rule})")
        if dropout is not None and self.max_assigned >= 2:
            try:
                graph.thresholds(self.max_assigned, degree=degree, tolerated_dropout=dropout)
            except ValueError as err:
                problems.append(f"secure_aggregation cannot run the over-selected cohort of {self.max_assigned} "
                                f"devices (goal_clients x over_selection): {err}")
        if self.dp_enabled and self.dp_mechanism == "ftrl":
            problems.append("dp_mechanism ftrl is not built with secure_aggregation yet (the tree release has not "
                            "been adapted to the unmasked sum and its larger sensitivity): use dp_mechanism fedavg")
        return problems

    @property
    def dp_enabled(self) -> bool:
        return self.dp_noise_multiplier is not None

    @property
    def secagg_tuned(self) -> bool:
        """Whether secure aggregation's grid is tuned to the sum (without DP) rather than fixed by
        update_bits (with DP: a tuned grid's coarse steps would add √P·step to the sensitivity the
        noise must cover; docs/secure_aggregation.md, "The tuned grid")."""
        return self.secure_aggregation is True and self.update_encoding == SECAGG and not self.dp_enabled

    @property
    def resolved_clipped_count_stddev(self) -> float:
        """sigma_b: as set, else goal / 20 (TFF's `gaussian_adaptive` default, 0.05 x clients per
        round), and 0 when Z is 0 (as TFF's: no noise anywhere)."""
        if self.dp_clipped_count_stddev is not None:
            return self.dp_clipped_count_stddev
        return 0.0 if self.dp_noise_multiplier == 0 else 0.05 * self.goal_clients

    @property
    def resolved_delta(self) -> float | None:
        """delta: as set, else 1 / N**1.1 when the population N is known (else None)."""
        if self.dp_delta is not None:
            return self.dp_delta
        return None if self.dp_population is None else 1.0 / self.dp_population ** 1.1

    def privacy_problems(self) -> list[str]:
        """What the differential-privacy settings cannot honour, one message each (empty when valid)."""
        problems = []

        def finite(value) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value)

        z = self.dp_noise_multiplier
        if z is not None and not (finite(z) and z >= 0):
            problems.append(f"dp_noise_multiplier must be a number >= 0, got {z}")
        if not (finite(self.dp_target_quantile) and 0.0 < self.dp_target_quantile < 1.0):
            problems.append(f"dp_target_quantile must be in (0, 1), got {self.dp_target_quantile}")
        if not (finite(self.dp_clip_learning_rate) and self.dp_clip_learning_rate > 0):
            problems.append(f"dp_clip_learning_rate must be a positive number, got {self.dp_clip_learning_rate}")
        sigma_b = self.dp_clipped_count_stddev
        if sigma_b is not None and not (finite(sigma_b) and sigma_b >= 0):
            problems.append(f"dp_clipped_count_stddev must be a number >= 0, got {sigma_b}")
        n = self.dp_population
        if n is not None and n < 1:
            problems.append(f"dp_population must be >= 1, got {n}")
        elif n is not None and n < self.goal_clients:
            problems.append(f"dp_population ({n}) must be >= goal_clients ({self.goal_clients})")
        delta = self.dp_delta
        if delta is not None:
            bound = 1.0 / n if n is not None and n >= 1 else 1.0
            if not (finite(delta) and 0.0 < delta < bound):
                where = f"1/dp_population = {bound:.3g}" if n is not None else "1"
                problems.append(f"dp_delta must be in (0, {where}), got {delta}")
        eps = self.dp_target_epsilon
        if eps is not None and not (finite(eps) and eps > 0):
            problems.append(f"dp_target_epsilon must be a positive number, got {eps}")
        if self.dp_mechanism not in ("fedavg", "ftrl"):
            problems.append(f"dp_mechanism must be fedavg or ftrl, got {self.dp_mechanism!r}")
        if isinstance(self.dp_min_separation, bool) or not isinstance(self.dp_min_separation, int) \
                or self.dp_min_separation < 0:
            problems.append(f"dp_min_separation must be an integer >= 0, got {self.dp_min_separation!r}")
        period = self.dp_tree_restart_period
        if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 1):
            problems.append(f"dp_tree_restart_period must be an integer >= 1, got {period!r}")
        if z is None:
            for name, on in (("dp_adaptive_clipping", self.dp_adaptive_clipping),
                             ("dp_mechanism ftrl", self.dp_mechanism == "ftrl"),
                             ("dp_min_separation", bool(self.dp_min_separation)),
                             ("dp_tree_restart_period", period is not None),
                             ("dp_clipped_count_stddev", sigma_b is not None),
                             ("dp_target_epsilon", eps is not None)):
                if on:
                    problems.append(f"{name} needs differential privacy on (set dp_noise_multiplier)")
            return problems
        if self.goal_clients < 1:
            problems.append(f"differential privacy divides by goal_clients, which must be >= 1, got {self.goal_clients}")
        if self.dp_mechanism == "ftrl":
            if self.server_optimizer != "sgd":
                problems.append("dp_mechanism ftrl is the server's optimizer (FTRL with server_lr and "
                                f"server_momentum): set server_optimizer sgd, got {self.server_optimizer!r}")
            if self.dp_adaptive_clipping:
                problems.append("dp_adaptive_clipping is not supported with dp_mechanism ftrl (the tree's "
                                "noise is calibrated to one fixed clip_norm)")
        else:
            for name, on in (("dp_min_separation", bool(self.dp_min_separation)),
                             ("dp_tree_restart_period", period is not None)):
                if on:
                    problems.append(f"{name} applies to dp_mechanism ftrl only")
        if sigma_b is not None and not self.dp_adaptive_clipping:
            problems.append("dp_clipped_count_stddev applies to dp_adaptive_clipping only")
        if (self.dp_adaptive_clipping and finite(z) and z > 0 and finite(self.resolved_clipped_count_stddev)
                and not z < 2 * self.resolved_clipped_count_stddev):
            problems.append(
                f"dp_noise_multiplier ({z}) must be below 2 x dp_clipped_count_stddev "
                f"({2 * self.resolved_clipped_count_stddev:g}) with adaptive clipping: the update noise "
                "z_delta = (Z^-2 - (2 sigma_b)^-2)^-1/2 is undefined otherwise; raise dp_clipped_count_stddev "
                "(default goal_clients / 20) or lower the noise multiplier")
        return problems

    @classmethod
    def of(cls, config) -> "TrainingConfig":
        """The training settings of any config that carries them (the server's, a parsed command's)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


TRAINING = TrainingConfig()

_DERIVED_HELP = {
    "dp_noise_multiplier": "none, differential privacy off",
    "dp_clipped_count_stddev": "goal_clients / 20",
    "dp_population": "unknown; `fedkb simulate`: --clients",
    "dp_delta": "1 / dp_population**1.1",
    "dp_target_epsilon": "none, no budget",
    "dp_tree_restart_period": "none, one tree",
    "update_bits": f"{DEFAULT_BITS} with hadamard; with secure aggregation {SECAGG_DEFAULT_BITS} bits per masked value "
                   f"(the tuned grid), or a fixed grid of b = {SECAGG_DP_DEFAULT_BITS} with DP",
    "secagg_degree": "every other device up to 32 devices, then the smallest even k >= 3 log2 n that the "
                     "tolerated dropout leaves unmaskable (fedkb_core.secagg.graph.default_degree)",
    "secagg_stage_timeout": "the task report window",
}


def field_help(name: str) -> str:
    """`(default: X)` for a flag's help text, with the derived defaults said in words."""
    if name == "min_clients":
        return f"(default: half the goal, {TRAINING.min_clients} for the default goal)"
    if name == "server_lr":
        return "(default: " + ", ".join(f"{lr} with {opt}" for opt, lr in SERVER_LR.items()) + ")"
    if name in _DERIVED_HELP:
        return f"(default: {_DERIVED_HELP[name]})"
    return f"(default: {getattr(TRAINING, name)})"
