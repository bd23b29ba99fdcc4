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
    file.write_text('{"goal_clients": 40, "min_clients": 5, "clip_norm": 2.0, "server_optimizer": "sgd"}')
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
    file.write_text('goal_clients = 12\nupdate_encoding = "hadamard"\nupdate_bits = 4\ntesting = true\n')
    config = load_config(file=file, environ={})
    assert (config.goal_clients, config.update_encoding, config.update_bits, config.testing) == (12, "hadamard", 4, True)


def test_secrets_are_required_outside_testing():
    with pytest.raises(ConfigError, match="enrollment_secret is not set.*admin_token is not set"):
        load_config(environ={})
    assert load_config(environ={}, overrides={"testing": True}).enrollment_secret is None


@pytest.mark.parametrize("overrides, message", [
    ({"goal_clients": 1, "min_clients": 2}, "goal_clients"),
    ({"over_selection": 0.9}, "over_selection"),
    ({"server_momentum": 1.0}, "server_momentum"),
    ({"update_encoding": "bf16"}, "update encoding must be one of"),
    ({"update_encoding": "int8"}, "update encoding must be one of"),  # removed: biased (docs/architecture.md)
    ({"update_encoding": "hadamard", "update_bits": 9}, "update bits must be an integer in 1..8"),
    ({"update_encoding": "hadamard", "update_bits": 0}, "update bits must be an integer in 1..8"),
    ({"update_bits": 4}, "update bits apply to the hadamard and secagg encodings only"),
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


def test_min_clients_defaults_to_half_the_goal_in_every_layer(tmp_path):
    file = tmp_path / "server.toml"
    file.write_text("goal_clients = 9\n")
    assert load_config(file=file, environ={"FEDKB_TESTING": "1"}).min_clients == 4
    assert load_config(environ={"FEDKB_TESTING": "1", "FEDKB_GOAL_CLIENTS": "1"}).min_clients == 1
    assert load_config(file=file, environ={"FEDKB_TESTING": "1", "FEDKB_MIN_CLIENTS": "9"}).min_clients == 9


def test_secret_files_in_each_layer_and_the_later_layer_wins(tmp_path):
    for name, text in (("enroll", "from-file\n"), ("admin", "admin-from-file"), ("enroll2", "from-env-file\n")):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    settings = tmp_path / "server.json"
    settings.write_text(f'{{"enrollment_secret_file": "{tmp_path / "enroll"}", "admin_token": "admin-in-file"}}')
    config = load_config(file=settings, environ={"FEDKB_ADMIN_TOKEN_FILE": str(tmp_path / "admin")})
    assert (config.enrollment_secret, config.admin_token) == ("from-file", "admin-from-file")
    config = load_config(file=settings, environ={"FEDKB_ENROLLMENT_SECRET_FILE": str(tmp_path / "enroll2")},
                         overrides={"admin_token_file": tmp_path / "admin"})
    assert (config.enrollment_secret, config.admin_token) == ("from-env-file", "admin-from-file")
    assert "from-file" not in str(config.public_json())


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("\n"), "empty"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: (p.write_text("x"), p.chmod(0)), "permission denied"),
])
def test_bad_secret_files_fail_with_the_file_and_the_reason(tmp_path, setup, message):
    import os

    path = tmp_path / "secret"
    setup(path)
    if message == "permission denied" and os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file")
    with pytest.raises(ConfigError, match=f"admin_token file {path}: {message}"):
        load_config(environ={"FEDKB_ENROLLMENT_SECRET": "s", "FEDKB_ADMIN_TOKEN_FILE": str(path)})


def test_a_secret_and_its_file_in_one_layer_is_ambiguous(tmp_path):
    (tmp_path / "s").write_text("x")
    with pytest.raises(ConfigError, match="both enrollment_secret and enrollment_secret_file"):
        load_config(environ={"FEDKB_ENROLLMENT_SECRET": "a", "FEDKB_ENROLLMENT_SECRET_FILE": str(tmp_path / "s"),
                             "FEDKB_ADMIN_TOKEN": "b"})


def test_a_world_readable_secret_file_is_used_with_a_warning(tmp_path, caplog):
    path = tmp_path / "secret"
    path.write_text("open-to-all")
    path.chmod(0o644)
    with caplog.at_level("WARNING"):
        config = load_config(environ={"FEDKB_ENROLLMENT_SECRET_FILE": str(path), "FEDKB_ADMIN_TOKEN": "b"})
    assert config.enrollment_secret == "open-to-all"
    assert "readable by every user" in caplog.text and str(path) in caplog.text


def test_connection_limits_are_validated():
    with pytest.raises(ConfigError, match="header_timeout must be a positive number"):
        load_config(environ={}, overrides={**SECRETS, "header_timeout": 0})
    with pytest.raises(ConfigError, match="max_connections and keep_alive must be >= 1"):
        load_config(environ={}, overrides={**SECRETS, "max_connections": 0})
