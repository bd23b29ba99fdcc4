"""Server configuration: one frozen dataclass, layered defaults → file → environment → overrides.

The layering follows Flask's tutorial factory (`from_mapping`, then `from_pyfile`, then the
test config) and `Config.from_prefixed_env("FEDKB")`: a setting may come from a JSON or TOML file,
from `FEDKB_<FIELD>` environment variables (for example `FEDKB_GOAL_CLIENTS=50`), or from
explicit overrides (command-line flags, tests), each layer winning over the one before.
Secrets have no default: outside testing the server refuses to start without them, unlike the
tutorial's `SECRET_KEY="dev"`; each may also come from a file (`<name>_file` in any layer), which
keeps it off the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from fedkb_core.errors import FedkbError
from fedkb_core.secret_files import SecretFileError, read_secret_file
from fedkb_core.training_config import TrainingConfig

ENV_PREFIX = "FEDKB_"


class ConfigError(FedkbError):
    """A setting that is missing, of the wrong type, or out of range."""


@dataclasses.dataclass(frozen=True)
class AggregatorConfig(TrainingConfig):
    """Everything the server needs to know; see `fedkb serve --help` for the flags.

    The round, aggregation and device-task settings (and their defaults) are the shared
    `TrainingConfig`'s; the fields here are the server's own.
    """

    # Storage.
    state_dir: Path = Path("state")
    init_model: Path | None = None  # folder written by `fedkb export`; copied in as the first version

    round_timeout: float = 600.0  # seconds from opening to the deadline
    # Seconds a device has from taking a task to uploading before its slot may go to another
    # device (None: a third of round_timeout). The task tells the device its `report_by` time.
    report_window: float | None = None

    # What a task asks of a device, beyond TrainingConfig's.
    device_batch_size: int | None = None  # None: the model's static B; anything else must equal it

    # Limits and pacing.
    max_body_bytes: int | None = None  # None: derived from the model (float32 update + header)
    retry_after: float = 30.0  # seconds a device waits when there is no work for it
    retry_jitter: float = 0.25  # retry_after is scaled by a uniform factor in [1-j, 1+j]

    # Connections, as the production server (gunicorn, `fedkb serve` without --dev) handles them:
    # a request must arrive whole in time before a thread serves it (aggregator/gunicorn_worker.py).
    header_timeout: float = 10.0  # seconds for the request line and headers
    body_timeout: float = 60.0  # seconds for the body after the headers (a 4.7 MB update at ~0.6 Mbit/s)
    max_connections: int = 256  # open connections per worker process; more wait in the listen queue
    keep_alive: int = 5  # seconds an idle kept-alive connection stays open

    # Secrets (no defaults outside testing). Also `enrollment_secret_file` / `admin_token_file`
    # (a path, in any layer: FEDKB_ADMIN_TOKEN_FILE, the config file, --admin-token-file).
    enrollment_secret: str | None = None
    admin_token: str | None = None

    # Process.
    testing: bool = False
    background_worker: bool = True  # fold, close and publish in a thread of this process
    worker_interval: float = 0.2  # seconds between background worker passes when idle
    checkpoint_interval: float = 1.0  # seconds of folding between running-sum checkpoints
    log_json: bool = True

    def __post_init__(self):
        super().__post_init__()  # resolves the derived defaults (min_clients, server_lr)

        # Absolute: Flask's send_file resolves a relative path against the app's package folder,
        # not the working directory, so `--state runs/server` would serve nothing.
        object.__setattr__(self, "state_dir", Path(self.state_dir).absolute())
        if self.init_model is not None:
            object.__setattr__(self, "init_model", Path(self.init_model).absolute())
        problems = self.training_problems()
        for name in ("round_timeout", "worker_interval", "header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number, got {value}")
        if self.report_window is not None and not (math.isfinite(self.report_window) and self.report_window > 0):
            problems.append(f"report_window must be a positive number of seconds, got {self.report_window}")
        if not (math.isfinite(self.checkpoint_interval) and self.checkpoint_interval >= 0):
            problems.append(f"checkpoint_interval must be >= 0, got {self.checkpoint_interval}")
        if self.device_batch_size is not None and self.device_batch_size < 1:
            problems.append(f"device_batch_size must be >= 1, got {self.device_batch_size}")
        if self.max_body_bytes is not None and self.max_body_bytes < 1024:
            problems.append(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_connections < 1 or self.keep_alive < 1:
            problems.append(f"max_connections and keep_alive must be >= 1, got {self.max_connections}, "
                            f"{self.keep_alive}")
        if not (self.retry_after > 0 and 0.0 <= self.retry_jitter < 1.0):
            problems.append("retry_after must be > 0 and retry_jitter in [0, 1)")
        if not self.testing:
            for name in ("enrollment_secret", "admin_token"):
                if not getattr(self, name):
                    problems.append(f"{name} is not set (--{name.replace('_', '-')}-file, FEDKB_{name.upper()}, "
                                    f"FEDKB_{name.upper()}_FILE or the config file); the server does not start "
                                    "without it")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def task_report_window(self) -> float:
        """Seconds from a task to its report-by time (`report_window`, else round_timeout / 3)."""
        return self.report_window if self.report_window is not None else self.round_timeout / 3.0

    @property
    def secagg_stage_seconds(self) -> float:
        """Seconds a SecAgg stage waits for its devices (`secagg_stage_timeout`, else the report window)."""
        return self.secagg_stage_timeout if self.secagg_stage_timeout is not None else self.task_report_window

    def public_json(self) -> dict:
        """The settings without the secrets (for /v1/status and logs)."""
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("enrollment_secret", "admin_token")}
        return {k: str(v) if isinstance(v, Path) else v for k, v in body.items()}


_FIELDS = {f.name: f for f in dataclasses.fields(AggregatorConfig)}
_SECRET_FILES = {"enrollment_secret_file": "enrollment_secret", "admin_token_file": "admin_token"}


def _base_type(annotation) -> type:
    """`int | None` → int, `Path` → Path (annotations are strings under `from __future__`)."""
    hint = typing.get_type_hints(AggregatorConfig)[annotation]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(name: str, value: Any, *, where: str) -> Any:
    kind = _base_type(name)
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null") and kind is not str):
        return None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError(f"not a boolean: {value!r}")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(f"not a number: {value!r}")
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {name}: {err}") from None


def _from_mapping(mapping: Mapping[str, Any], *, where: str) -> dict:
    out = {}
    for key, value in mapping.items():
        name = key.lower().replace("-", "_")
        if name in _SECRET_FILES:
            continue
        if name not in _FIELDS:
            raise ConfigError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted([*_FIELDS, *_SECRET_FILES]))}")
        out[name] = _coerce(name, value, where=where)
    for key, value in mapping.items():
        name = key.lower().replace("-", "_")
        if name in _SECRET_FILES and value is not None:
            secret = _SECRET_FILES[name]
            if secret in out:
                raise ConfigError(f"{where}: both {secret} and {name} are set; keep one")
            try:
                out[secret] = read_secret_file(Path(value), what=f"{where}: {secret}")
            except SecretFileError as err:
                raise ConfigError(str(err)) from None
    return out


def _read_file(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    try:
        if str(path).endswith(".toml"):
            import tomllib

            body = tomllib.loads(text)
        else:
            body = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"config file {path}: cannot parse ({err})") from None
    if not isinstance(body, dict):
        raise ConfigError(f"config file {path}: expected a table/object of settings")
    return _from_mapping(body, where=str(path))


def _from_env(environ: Mapping[str, str]) -> dict:
    picked = {k[len(ENV_PREFIX):]: v for k, v in environ.items()
              if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() in (*_FIELDS, *_SECRET_FILES)}
    return _from_mapping(picked, where="environment")


def load_config(*, file: Path | str | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> AggregatorConfig:
    """Build the config from defaults, then a JSON/TOML file, then `FEDKB_*` variables, then overrides.

    Args:
        file: optional JSON (or `.toml`) file of settings, keys as the field names.
        environ: the environment to read `FEDKB_*` from (default `os.environ`); only names that
            are settings are read, so `FEDKB_LOG_LEVEL`-style variables of other parts are ignored.
        overrides: explicit values (flags, tests); `None` values are skipped so unset flags do
            not mask lower layers.

    Raises:
        ConfigError: an unknown setting, a value of the wrong type or out of range, or a
            missing secret outside testing.
    """
    values: dict[str, Any] = {}
    if file is not None:
        values.update(_read_file(Path(file)))
    values.update(_from_env(os.environ if environ is None else environ))
    if overrides:
        values.update(_from_mapping({k: v for k, v in overrides.items() if v is not None}, where="overrides"))
    return AggregatorConfig(**values)
