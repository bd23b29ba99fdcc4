"""HTTP messages between the edge runtime and the aggregator, as typed dataclasses.

Both sides import this module (it needs neither Flask nor TensorFlow), so a field renamed here
is renamed everywhere. Routes decode JSON into these classes, call the logic, and encode the
result; they do no maths. Every error body is `{"error": CODE, "message": TEXT}`.

Endpoints (docs/architecture.md):
    POST /v1/devices                      EnrollRequest -> EnrollResponse (201)
    GET  /v1/models/latest                -> manifest.json of the current version
    GET  /v1/models/<version>/<file>      -> file bytes, ETag = sha256
    POST /v1/checkin                      CheckinRequest -> CheckinResponse
    POST /v1/rounds/<round_id>/updates    safetensors body (fedkb_core.wire) -> UploadResponse
    GET  /v1/status, GET /                public status, dashboard (aggregator/routes/operators.py)
    GET  /v1/admin/status, GET /metrics   operator status, Prometheus (admin bearer token)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


# SQLite's integers, and what any id or count in a message must fit.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class ProtocolError(ValueError):
    """A JSON body that does not have the fields and types a message needs."""


def _require(body: Any, name: str, kind, *, where: str, optional: bool = False, default=None):
    if not isinstance(body, dict):
        raise ProtocolError(f"{where}: expected a JSON object")
    if name not in body or body[name] is None:
        if optional:
            return default
        raise ProtocolError(f"{where}: missing field {name!r}")
    value = body[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = json_float(value)
        if value is None:
            raise ProtocolError(f"{where}: field {name!r} must be finite")
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ProtocolError(f"{where}: field {name!r} must be {getattr(kind, '__name__', kind)}")
    if kind is float and not math.isfinite(value):
        raise ProtocolError(f"{where}: field {name!r} must be finite")
    if kind is int and not INT64_MIN <= value <= INT64_MAX:
        raise ProtocolError(f"{where}: field {name!r} is out of range")
    return value


def json_float(value: object) -> float | None:
    """A JSON number as a finite float, or None (not a number, a bool, or beyond float range).

    JSON has no size limit on numbers: Python parses a 400-digit literal as an int, and `float()`
    of it raises OverflowError instead of giving a number a message can refuse.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class DeviceState:
    """What a device reports about itself at check-in (the server may use it for pacing)."""

    idle: bool
    charging: bool
    unmetered: bool
    battery: float  # percent, 0–100

    @classmethod
    def from_json(cls, body: Any) -> "DeviceState":
        w = "state"
        state = cls(
            idle=_require(body, "idle", bool, where=w),
            charging=_require(body, "charging", bool, where=w),
            unmetered=_require(body, "unmetered", bool, where=w),
            battery=_require(body, "battery", float, where=w),
        )
        if not 0.0 <= state.battery <= 100.0:
            raise ProtocolError("state: battery must be within 0..100")
        return state


@dataclasses.dataclass(frozen=True)
class EnrollRequest:
    """A device asks to join, proving it knows the fleet's enrollment secret."""

    enrollment_secret: str
    platform: str = "unknown"

    @classmethod
    def from_json(cls, body: Any) -> "EnrollRequest":
        return cls(
            enrollment_secret=_require(body, "enrollment_secret", str, where="enrollment"),
            platform=_require(body, "platform", str, where="enrollment", optional=True, default="unknown"),
        )


@dataclasses.dataclass(frozen=True)
class EnrollResponse:
    """The device's id and bearer token (shown once; the server keeps only a hash)."""

    device_id: str
    token: str


@dataclasses.dataclass(frozen=True)
class CheckinRequest:
    """A device that is eligible to train asks for work."""

    model_version: int | None
    state: DeviceState

    @classmethod
    def from_json(cls, body: Any) -> "CheckinRequest":
        version = _require(body, "model_version", int, where="checkin", optional=True)
        return cls(model_version=version, state=DeviceState.from_json(_require(body, "state", dict, where="checkin")))


@dataclasses.dataclass(frozen=True)
class SecAggTask:
    """What a secure-aggregation round adds to a task: the bits r of every masked value of the
    update's body (its sum is read modulo 2^r), whether every device weighs 1 (DP) or by its
    example count, whether the vector carries adaptive clipping's "not clipped" bit, and a tuned
    grid's steps (docs/secure_aggregation.md)."""

    modulus_bits: int
    unit_weights: bool = False
    count_unclipped: bool = False
    # The tuned grid's step per rotation block (rounds without DP), or None: the fixed grid.
    steps: tuple[float, ...] | None = None

    MAX_STEPS = 1 << 16  # blocks of 16,384: models up to a billion parameters

    @classmethod
    def from_json(cls, body: Any) -> "SecAggTask":
        w = "task.secagg"
        raw_steps = _require(body, "steps", (list, tuple), where=w, optional=True)
        steps = None
        if raw_steps is not None:
            if not 1 <= len(raw_steps) <= cls.MAX_STEPS:
                raise ProtocolError(f"{w}: steps must list 1..{cls.MAX_STEPS} numbers, got {len(raw_steps)}")
            steps = tuple(json_float(x) for x in raw_steps)
            if any(x is None or not x > 0 for x in steps):
                raise ProtocolError(f"{w}: every step must be a finite number > 0")
        task = cls(modulus_bits=_require(body, "modulus_bits", int, where=w),
                   unit_weights=_require(body, "unit_weights", bool, where=w, optional=True, default=False),
                   count_unclipped=_require(body, "count_unclipped", bool, where=w, optional=True, default=False),
                   steps=steps)
        if not 1 <= task.modulus_bits <= 32:
            raise ProtocolError(f"{w}: modulus_bits must be within 1..32, got {task.modulus_bits}")
        return task


@dataclasses.dataclass(frozen=True)
class RoundTask:
    """One device's work for one round (the server's RoundConfig as the device sees it)."""

    round_id: int
    model_version: int
    learning_rate: float
    epochs: int
    batch_size: int
    max_examples: int
    clip_norm: float
    deadline: float  # unix seconds; uploads after it are refused
    encoding: str = "float32"
    # hadamard only: bits per coordinate, and the round's rotation seed (drawn by the server from
    # the OS's CSPRNG when the round opens). Absent for the float encodings.
    update_bits: int | None = None
    rotation_seed: int | None = None
    # unix seconds (<= deadline); past it without an upload, the server may give the task's slot
    # to another device, and an upload then gets 409 `task_expired`. Absent from older servers.
    report_by: float | None = None
    # secure aggregation only (encoding "secagg"; docs/secure_aggregation.md)
    secagg: SecAggTask | None = None

    @classmethod
    def from_json(cls, body: Any) -> "RoundTask":
        w = "task"
        return cls(
            round_id=_require(body, "round_id", int, where=w),
            model_version=_require(body, "model_version", int, where=w),
            learning_rate=_require(body, "learning_rate", float, where=w),
            epochs=_require(body, "epochs", int, where=w),
            batch_size=_require(body, "batch_size", int, where=w),
            max_examples=_require(body, "max_examples", int, where=w),
            clip_norm=_require(body, "clip_norm", float, where=w),
            deadline=_require(body, "deadline", float, where=w),
            encoding=_require(body, "encoding", str, where=w, optional=True, default="float32"),
            update_bits=_require(body, "update_bits", int, where=w, optional=True),
            rotation_seed=_require(body, "rotation_seed", int, where=w, optional=True),
            report_by=_require(body, "report_by", float, where=w, optional=True),
            secagg=_secagg_task(body, w),
        )


def _secagg_task(body: Any, where: str) -> SecAggTask | None:
    raw = _require(body, "secagg", dict, where=where, optional=True)
    return None if raw is None else SecAggTask.from_json(raw)


@dataclasses.dataclass(frozen=True)
class CheckinResponse:
    """Either a task (`action == "train"`) or "come back later" with a retry-after."""

    action: str  # "train" | "wait"
    task: RoundTask | None = None
    retry_after: float | None = None  # seconds, with jitter, when action == "wait"
    reason: str | None = None  # why waiting: "no_open_round", "round_full", "task_expired", ...

    @classmethod
    def from_json(cls, body: Any) -> "CheckinResponse":
        action = _require(body, "action", str, where="checkin response")
        if action == "train":
            return cls(action, task=RoundTask.from_json(_require(body, "task", dict, where="checkin response")))
        if action == "wait":
            return cls(action, retry_after=_require(body, "retry_after", float, where="checkin response"),
                       reason=_require(body, "reason", str, where="checkin response", optional=True))
        raise ProtocolError(f"checkin response: unknown action {action!r}")


@dataclasses.dataclass(frozen=True)
class EvaluationRequest:
    """An operator attaches evaluation metrics to a version: `{"model_version": v, "eval": {...}}`."""

    model_version: int
    eval: dict[str, float]

    @classmethod
    def from_json(cls, body: Any) -> "EvaluationRequest":
        w = "evaluation"
        version = _require(body, "model_version", int, where=w)
        raw = _require(body, "eval", dict, where=w)
        if len(raw) > 100:
            raise ProtocolError(f"{w}: at most 100 metrics, got {len(raw)}")
        metrics = {}
        for key, value in raw.items():
            number = json_float(value)
            if len(key) > 100 or number is None:
                raise ProtocolError(f"{w}: metric {key[:100]!r} must be named in at most 100 characters "
                                    "and be a finite number")
            metrics[key] = value if isinstance(value, int) and abs(value) <= 1 << 53 else number
        return cls(model_version=version, eval=metrics)


@dataclasses.dataclass(frozen=True)
class UploadResponse:
    """The server's answer to an upload: accepted (possibly a duplicate) or not."""

    status: str  # "accepted"
    update_id: int
    duplicate: bool = False
    update_norm: float | None = None  # norm the server measured before its own clipping


def to_json(message) -> dict:
    """Encode any message dataclass as a JSON-ready dict (None fields dropped)."""
    return {k: v for k, v in dataclasses.asdict(message).items() if v is not None}
