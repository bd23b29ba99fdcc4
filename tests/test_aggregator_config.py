"""Server configuration layering and the app factory's handling of it; round policy decisions."""

import random

import pytest

from aggregator.app import create_app
from aggregator.config import AggregatorConfig, ConfigError, load_config
from aggregator.rounds import (ABANDONED, CLOSING, OPEN, RoundRecord, checkin_decision, deadline_outcome,
                               retry_after, state_after_accept)
from tests.fixtures_aggregator import ADMIN, SECRET, make_weights_model

SECRETS = {"enrollment_secret": "s", "admin_token": "a"}


def test_layers_defaults_file_env_overrides(tmp_path):
    file = tmp_path / "server.json"
    file.write_text('{"goal_clients": 40, "min_clients": 5, "clip_norm": 2.0}')
    env = {"FEDKB_GOAL_CLIENTS": "50", "FEDKB_SERVER_MOMENTUM": "0.9", "FEDKB_UNRELATED": "x", **{
        "FEDKB_ENROLLMENT_SECRET": "s", "FEDKB_ADMIN_TOKEN": "a"}}
    config = load_config(file=file, environ=env, overrides={"min_clients": 7, "clip_norm": None})
    assert config.goal_clients == 50  # env beats file
    assert config.min_clients == 7  # overrides beat file
    assert config.clip_norm == 2.0  # a None override does not mask the file
    assert config.server_momentum == 0.9
    assert config.round_timeout == AggregatorConfig.round_timeout  # default
    assert config.max_assigned == 65  # ceil(50 × 1.3)


def test_toml_file(tmp_path):
    file = tmp_path / "server.toml"
    file.write_text('goal_clients = 12\nencoding = "float16"\ntesting = true\n')
    config = load_config(file=file, environ={})
    assert (config.goal_clients, config.encoding, config.testing) == (12, "float16", True)


def test_secrets_are_required_outside_testing():
    with pytest.raises(ConfigError, match="enrollment_secret is not set.*admin_token is not set"):
        load_config(environ={})
    assert load_config(environ={}, overrides={"testing": True}).enrollment_secret is None


@pytest.mark.parametrize("overrides, message", [
    ({"goal_clients": 1, "min_clients": 2}, "goal_clients"),
    ({"over_selection": 0.9}, "over_selection"),
    ({"server_momentum": 1.0}, "server_momentum"),
    ({"encoding": "bf16"}, "encoding"),
    ({"clip_norm": "abc"}, "clip_norm"),
    ({"goal_clients": 2.5}, "not an integer"),
    ({"nonsense": 1}, "unknown setting 'nonsense'"),
])
def test_bad_settings_fail_fast_with_their_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, overrides={**SECRETS, **overrides})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="environment: goal_clients"):
        load_config(environ={"FEDKB_GOAL_CLIENTS": "many", **{"FEDKB_TESTING": "1"}})


def test_factory(tmp_path):
    model = make_weights_model(tmp_path / "model")
    base = dict(state_dir=tmp_path / "state", init_model=model, enrollment_secret=SECRET, admin_token=ADMIN,
                background_worker=False)
    assert not create_app(base).testing
    assert create_app({**base, "testing": True}).testing
    with pytest.raises(ConfigError, match="holds no model yet"):
        create_app({**base, "state_dir": tmp_path / "empty", "init_model": None})


def _round(**kw):
    base = dict(id=1, model_version=1, state=OPEN, opened_at=0.0, deadline=100.0, min_clients=2, goal_clients=4,
                max_assigned=6, clip_norm=1.0, learning_rate=0.1, epochs=1, batch_size=2, max_examples=100,
                encoding="float32")
    return RoundRecord(**{**base, **kw})


@pytest.mark.parametrize("round_kw, has_task, submitted, now, expected", [
    (None, False, False, 1.0, "no_open_round"),
    ({}, False, False, 1.0, "assign"),
    ({}, True, False, 1.0, "train"),
    ({}, True, True, 1.0, "already_submitted"),
    ({"assigned": 6}, False, False, 1.0, "round_full"),
    ({"assigned": 6}, True, False, 1.0, "train"),  # a holder of a task gets it again
    ({}, False, False, 100.0, "no_open_round"),  # past the deadline
    ({"state": CLOSING}, True, False, 1.0, "no_open_round"),
])
def test_checkin_decisions(round_kw, has_task, submitted, now, expected):
    round_ = None if round_kw is None else _round(**round_kw)
    assert checkin_decision(round_, has_task=has_task, has_submitted=submitted, now=now) == expected


@pytest.mark.parametrize("round_kw, now, expected", [
    ({"accepted": 1}, 99.0, None),
    ({"accepted": 1}, 100.0, ABANDONED),
    ({"accepted": 2}, 100.0, CLOSING),
    ({"accepted": 2, "state": CLOSING}, 100.0, None),
])
def test_deadline_outcomes(round_kw, now, expected):
    assert deadline_outcome(_round(**round_kw), now) == expected


def test_goal_closes_and_retry_after_is_jittered():
    assert state_after_accept(_round(accepted=2)) == OPEN
    assert state_after_accept(_round(accepted=3)) == CLOSING
    rng = random.Random(0)
    values = [retry_after(10.0, 0.25, rng) for _ in range(200)]
    assert all(7.5 <= v <= 12.5 for v in values) and len(set(values)) > 50
