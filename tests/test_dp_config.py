"""The differential-privacy settings: one set of names in `fedkb serve`, `fedkb simulate` and the
config file, and a clear one-line error at start for every setting DP cannot honour."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedkb.cli import build_parser
from fedkb.commands.serve import config_from_args
from fedkb.commands.simulate import fleet_config_from_args
from fedkb_core.errors import FedkbError
from fedkb_core.training_config import TrainingConfig
from simulation.fleet import serve_arguments

ENV = {"FEDKB_ENROLLMENT_SECRET": "s", "FEDKB_ADMIN_TOKEN": "a"}


def _served(tmp_path, *argv: str, environ=ENV) -> TrainingConfig:
    args = build_parser().parse_args(["serve", "--state", str(tmp_path / "state"), *argv])
    return TrainingConfig.of(config_from_args(args, environ=environ))


def test_dp_is_off_by_default(tmp_path):
    served = _served(tmp_path)
    assert not served.dp_enabled and served.dp_noise_multiplier is None and not served.dp_adaptive_clipping


def test_serve_flags_environment_and_file_give_the_same_dp_settings(tmp_path):
    flags = _served(tmp_path, "--dp-noise-multiplier", "0.5", "--dp-adaptive-clipping", "--dp-target-quantile",
                    "0.7", "--dp-clip-learning-rate", "0.3", "--dp-population", "1000", "--target-epsilon", "8")
    env = _served(tmp_path, environ={**ENV, "FEDKB_DP_NOISE_MULTIPLIER": "0.5", "FEDKB_DP_ADAPTIVE_CLIPPING": "true",
                                     "FEDKB_DP_TARGET_QUANTILE": "0.7", "FEDKB_DP_CLIP_LEARNING_RATE": "0.3",
                                     "FEDKB_DP_POPULATION": "1000", "FEDKB_DP_TARGET_EPSILON": "8"})
    file = tmp_path / "dp.toml"
    file.write_text("dp_noise_multiplier = 0.5\ndp_adaptive_clipping = true\ndp_target_quantile = 0.7\n"
                    "dp_clip_learning_rate = 0.3\ndp_population = 1000\ndp_target_epsilon = 8.0\n")
    from_file = _served(tmp_path, "--config", str(file))
    assert flags == env == from_file
    assert (flags.dp_noise_multiplier, flags.dp_adaptive_clipping, flags.dp_target_quantile,
            flags.dp_clip_learning_rate, flags.dp_population, flags.dp_target_epsilon) == (0.5, True, 0.7, 0.3, 1000, 8.0)
    # The derived defaults: sigma_b = goal / 20, delta = 1 / N**1.1.
    assert flags.resolved_clipped_count_stddev == pytest.approx(20 / 20)
    assert flags.resolved_delta == pytest.approx(1000 ** -1.1)


def test_simulate_passes_its_dp_settings_to_the_server_it_starts(tmp_path):
    args = build_parser().parse_args(["simulate", "--out", str(tmp_path / "sim"), "--clients", "40",
                                      "--clients-per-round", "10", "--dp-noise-multiplier", "0.3",
                                      "--dp-adaptive-clipping", "--dp-clipped-count-stddev", "2"])
    fleet = fleet_config_from_args(args)
    assert fleet.dp_population == 40  # the fleet is the population
    served = _served(tmp_path, *serve_arguments(fleet))
    assert (served.dp_noise_multiplier, served.dp_adaptive_clipping, served.dp_clipped_count_stddev,
            served.dp_population, served.goal_clients) == (0.3, True, 2.0, 40, 10)


@pytest.mark.parametrize("argv, message", [
    (("--dp-noise-multiplier", "-1"), "dp_noise_multiplier must be a number >= 0, got -1.0"),
    (("--dp-noise-multiplier", "nan"), "dp_noise_multiplier must be a number >= 0"),
    (("--dp-noise-multiplier", "1", "--dp-target-quantile", "1"), "dp_target_quantile must be in (0, 1), got 1.0"),
    (("--dp-noise-multiplier", "1", "--dp-target-quantile", "0"), "dp_target_quantile must be in (0, 1)"),
    (("--dp-noise-multiplier", "1", "--dp-clip-learning-rate", "0"), "dp_clip_learning_rate must be a positive"),
    (("--dp-noise-multiplier", "1", "--dp-adaptive-clipping", "--dp-clipped-count-stddev", "-0.5"),
     "dp_clipped_count_stddev must be a number >= 0"),
    (("--dp-noise-multiplier", "1", "--dp-population", "100", "--dp-delta", "0.01"),
     "dp_delta must be in (0, 1/dp_population = 0.01), got 0.01"),
    (("--dp-noise-multiplier", "1", "--dp-delta", "0"), "dp_delta must be in (0, 1), got 0.0"),
    (("--dp-noise-multiplier", "1", "--target-epsilon", "0"), "dp_target_epsilon must be a positive number"),
    (("--dp-noise-multiplier", "1", "--dp-population", "5"), "dp_population (5) must be >= goal_clients (20)"),
    (("--clip-norm", "0", "--dp-noise-multiplier", "1"), "clip_norm must be a positive number, got 0.0"),
    (("--dp-adaptive-clipping",), "dp_adaptive_clipping needs differential privacy on"),
    (("--target-epsilon", "3"), "dp_target_epsilon needs differential privacy on"),
    (("--dp-noise-multiplier", "1", "--dp-clipped-count-stddev", "1"),
     "dp_clipped_count_stddev applies to dp_adaptive_clipping only"),
    # sigma_b = 20 / 20 = 1: Z = 2 leaves z_delta undefined (TFF's adaptive_clip_noise_params refuses it too).
    (("--dp-noise-multiplier", "2", "--dp-adaptive-clipping"), "must be below 2 x dp_clipped_count_stddev (2)"),
])
def test_settings_dp_cannot_honour_are_refused_at_start(tmp_path, argv, message):
    from aggregator.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _served(tmp_path, *argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_simulate_refuses_dp_settings_it_cannot_honour(tmp_path):
    parser = build_parser()
    with pytest.raises(FedkbError, match="dp_target_quantile must be in"):
        fleet_config_from_args(parser.parse_args(["simulate", "--out", str(tmp_path), "--dp-noise-multiplier", "1",
                                                  "--dp-target-quantile", "1.5"]))
    with pytest.raises(FedkbError, match="--backend fedkb only"):
        fleet_config_from_args(parser.parse_args(["simulate", "--out", str(tmp_path), "--backend", "tff",
                                                  "--dp-noise-multiplier", "1"]))


def test_serve_refuses_a_bad_dp_setting_in_one_line_and_writes_nothing(tmp_path):
    state = tmp_path / "state"
    result = subprocess.run([sys.executable, "-m", "fedkb", "serve", "--state", str(state), "--dp-noise-multiplier",
                             "-0.5"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **ENV})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "dp_noise_multiplier must be a number >= 0, got -0.5" in lines[0], result.stderr
    assert not state.exists()


def test_both_helps_print_the_dp_defaults(capsys):
    parser = build_parser()
    for command in ("serve", "simulate"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for expected in ("--dp-noise-multiplier", "(default: none, differential privacy off)",
                         "--dp-target-quantile", "(default: 0.5)", "(default: 0.2)", "(default: goal_clients / 20)",
                         "(default: 1 / dp_population**1.1)", "--target-epsilon"):
            assert expected in text, (command, expected)
