"""One configuration: `fedkb serve` and `fedkb simulate` resolve to the same round, device and
server-optimizer settings, through their real argument parsing, and those are the measured ones."""

from __future__ import annotations

import json

import pytest

from fedkb.cli import build_parser
from fedkb.commands.serve import config_from_args
from fedkb.commands.simulate import fleet_config_from_args
from fedkb_core.training_config import TrainingConfig
from simulation.fleet import FleetConfig, serve_arguments

ENV = {"FEDKB_ENROLLMENT_SECRET": "s", "FEDKB_ADMIN_TOKEN": "a"}


def _served(tmp_path, *argv: str, environ=ENV) -> TrainingConfig:
    args = build_parser().parse_args(["serve", "--state", str(tmp_path / "state"), *argv])
    return TrainingConfig.of(config_from_args(args, environ=environ))


def _simulated(tmp_path, *argv: str) -> tuple[FleetConfig, TrainingConfig]:
    """What `fedkb simulate ARGV` runs: its fleet, and the server that fleet starts."""
    fleet = fleet_config_from_args(build_parser().parse_args(["simulate", "--out", str(tmp_path / "sim"), *argv]))
    return fleet, _served(tmp_path, *serve_arguments(fleet))


@pytest.mark.parametrize("simulate_argv, serve_argv", [
    ((), ()),
    (("--server-optimizer", "sgd"), ("--server-optimizer", "sgd")),  # the lr follows the optimizer in both
    (("--clients-per-round", "8"), ("--goal-clients", "8")),  # min clients: half the goal in both
    (("--update-encoding", "hadamard"), ("--update-encoding", "hadamard")),  # 8 bits unless told, in both
    (("--update-encoding", "hadamard", "--update-bits", "3"), ("--update-encoding", "hadamard", "--update-bits", "3")),
    # secure aggregation: the secagg encoding at 12 bits unless told, in both
    (("--secure-aggregation",), ("--secure-aggregation",)),
    (("--secure-aggregation", "--update-bits", "10", "--secagg-tolerated-dropout", "0.3", "--secagg-degree", "8",
      "--secagg-stage-timeout", "45", "--clients-per-round", "30"),
     ("--secure-aggregation", "--update-bits", "10", "--secagg-tolerated-dropout", "0.3", "--secagg-degree", "8",
      "--secagg-stage-timeout", "45", "--goal-clients", "30")),
])
def test_serve_and_simulate_resolve_to_the_same_settings(tmp_path, simulate_argv, serve_argv):
    fleet, simulated = _simulated(tmp_path, *simulate_argv)
    served = _served(tmp_path, *serve_argv)
    assert simulated == served
    # The TFF backend reads the fleet's own fields: they are the same settings.
    assert (fleet.clients_per_round, fleet.over_selection, fleet.clip_norm, fleet.server_optimizer, fleet.server_lr,
            fleet.server_momentum, fleet.device_lr, fleet.device_epochs, fleet.max_examples) == (
        served.goal_clients, served.over_selection, served.clip_norm, served.server_optimizer, served.server_lr,
        served.server_momentum, served.device_lr, served.device_epochs, served.device_max_examples)


def test_the_defaults_are_the_settings_the_readme_measured(tmp_path):
    # README, "Federated vs centralized": FedAdam (server lr 0.03, beta 0.9/0.99, eps 1e-3), device
    # SGD at lr 1.0, one epoch over at most 64 windows, clip norm 1, 20 updates per round.
    served = _served(tmp_path)
    assert (served.server_optimizer, served.server_lr, served.server_beta1, served.server_beta2,
            served.server_epsilon) == ("adam", 0.03, 0.9, 0.99, 1e-3)
    assert (served.device_lr, served.device_epochs, served.device_max_examples) == (1.0, 1, 64)
    assert (served.goal_clients, served.min_clients, served.clip_norm, served.over_selection) == (20, 10, 1.0, 1.3)


def test_config_file_and_environment_resolve_from_the_same_defaults(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    assert _served(tmp_path, "--config", str(empty)) == _served(tmp_path)
    settings = tmp_path / "server.json"
    settings.write_text(json.dumps({"server_optimizer": "sgd", "goal_clients": 6}))
    from_file = _served(tmp_path, "--config", str(settings))
    from_env = _served(tmp_path, environ={**ENV, "FEDKB_SERVER_OPTIMIZER": "sgd", "FEDKB_GOAL_CLIENTS": "6"})
    from_flags = _served(tmp_path, "--server-optimizer", "sgd", "--goal-clients", "6")
    assert from_file == from_env == from_flags
    assert (from_file.server_lr, from_file.min_clients) == (1.0, 3)  # derived defaults follow the layer


def test_both_helps_print_the_defaults(capsys):
    parser = build_parser()
    for command in ("serve", "simulate"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "0.03 with adam, 1.0 with sgd" in text, command
        assert "(default: 64)" in text and "(default: 20)" in text and "(default: adam)" in text, command
