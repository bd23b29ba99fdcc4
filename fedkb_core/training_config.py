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

    def __post_init__(self):
        if self.min_clients is None and isinstance(self.goal_clients, int):
            object.__setattr__(self, "min_clients", max(1, self.goal_clients // 2))
        if self.server_lr is None and self.server_optimizer in SERVER_LR:
            object.__setattr__(self, "server_lr", SERVER_LR[self.server_optimizer])

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
        return problems

    @classmethod
    def of(cls, config) -> "TrainingConfig":
        """The training settings of any config that carries them (the server's, a parsed command's)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


TRAINING = TrainingConfig()


def field_help(name: str) -> str:
    """`(default: X)` for a flag's help text, with the derived defaults said in words."""
    if name == "min_clients":
        return f"(default: half the goal, {TRAINING.min_clients} for the default goal)"
    if name == "server_lr":
        return "(default: " + ", ".join(f"{lr} with {opt}" for opt, lr in SERVER_LR.items()) + ")"
    return f"(default: {getattr(TRAINING, name)})"
