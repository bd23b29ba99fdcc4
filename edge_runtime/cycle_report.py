"""What one device cycle did: `CycleReport` (logged, printed by `fedkb device --format json`).

Its own module so that the device loop (`edge_runtime.device`) and the secure-aggregation steps it
runs (`edge_runtime.secagg_job`) both build reports without importing each other; `edge_runtime.device`
re-exports it. The actions and reasons are listed in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CycleReport:
    """What one cycle did (logged, printed by `fedkb device --format json`)."""

    action: str  # ineligible | wait | no_data | model_rejected | refused | interrupted | abandoned | accepted |
    #              duplicate | dropped | rejected | upload_failed | not_finite | error; secure aggregation:
    #              secagg_advertised | secagg_wait | secagg_shared | secagg_unmasked | secagg_done |
    #              secagg_dropped | secagg_refused (and the upload's actions for its masked update)
    reasons: tuple[str, ...] = ()
    round_id: int | None = None
    model_version: int | None = None
    retry_after: float | None = None
    num_examples: int = 0
    update_norm: float | None = None
    upload_bytes: int = 0
    upload_attempts: int = 0
    steps: int = 0
    mean_loss: float | None = None
    message: str | None = None  # for "error": what went wrong and what the operator can do
    stage: str | None = None  # secure aggregation: the round's stage the server reported after this step
    secagg_ms: float | None = None  # secure aggregation: this step's CPU ms in keys, shares, masks or unmask
    encode_ms: float | None = None  # secure aggregation: CPU ms encoding the update onto the round's grid

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, (), 0) or k == "action"}
