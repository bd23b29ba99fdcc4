"""Operator endpoints: status JSON, Prometheus metrics, the dashboard page and admin actions.

What anyone may read (`GET /v1/status`, the page `/` and its files) is what a device or a
passer-by learns anyway: that the server is up, the current model version (every version's files
are public downloads), whether a round is open, for which version, until when, and with
differential privacy on the ε spent so far with its δ, mechanism, accountant and sampling
assumption, and whether the target ε lets another round open (`privacy`, without the clip norm:
a device's user is owed that figure; it makes the population N and the expected cohort public,
as the assumption cannot be read without them). Everything
that describes the fleet or the machine needs the admin bearer token: round progress and device
counts, per-update norms, rejections by reason, evaluations, the worker's errors, the
configuration with its paths (`GET /v1/admin/status`), and Prometheus (`GET /metrics`; a
scraper sends the token, e.g. Prometheus' `authorization: {credentials_file: ...}`). Changing
anything (`POST /v1/admin/...`) needs the same token.
"""

from __future__ import annotations

import dataclasses
import json
import time

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aggregator import db, secagg_stages
from aggregator.dashboard import dashboard_html
from aggregator.errors import Conflict, NotFound
from aggregator.privacy import privacy_json
from aggregator.routes import json_body, require_admin, server
from fedkb_core.protocol import EvaluationRequest

bp = Blueprint("operators", __name__)

# The parts of a round and of a version that say nothing about the fleet.
PUBLIC_ROUND_FIELDS = ("id", "state", "model_version", "opened_at", "deadline")
PUBLIC_VERSION_FIELDS = ("version", "parent_version", "round_id", "created_at")


def _round_json(conn, round_) -> dict:
    body = dataclasses.asdict(round_)
    for name in ("secagg_steps", "secagg_block_rms", "secagg_dropped_blocks"):  # JSON text: shown as lists
        if body.get(name) is not None:
            body[name] = json.loads(body[name])
    body["rejected"] = db.rejections(conn, round_.id)
    body["accepted_updates"] = round_.accepted
    if round_.secure:  # the cohort's stage, its deadline and devices per stage (frozen once it ended)
        body["secagg"] = secagg_stages.status_json(conn, round_)
    return body


def _uncached(body: dict) -> Response:
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    return response


def public_status(conn, config) -> dict:
    """What `GET /v1/status` shows anyone: liveness, the current version, the open round's timing,
    and with DP on the privacy spent (see the module docstring)."""
    active = db.active_round(conn)
    return {
        "time": time.time(),
        "model_version": db.latest_version(conn),
        "round": {k: getattr(active, k) for k in PUBLIC_ROUND_FIELDS} if active else None,
        "versions": [{k: v[k] for k in PUBLIC_VERSION_FIELDS} for v in db.versions(conn)],
        "privacy": privacy_json(conn, config, public=True),
        "secure_aggregation": bool(config.secure_aggregation),
    }


def operator_status(conn, state) -> dict:
    """Everything the operator's dashboard shows: the active round and its counts, recent rounds
    with their outcomes, version history with evaluations, update norms, totals, worker, config."""
    active = db.active_round(conn)
    recent = db.recent_rounds(conn, 20)
    versions = db.versions(conn)
    for v in versions:
        raw = v.pop("eval_json")
        v["eval"] = json.loads(raw) if raw else None
    # The chart shows the norms of the active round, or of the last finished one while it is empty
    # (never a SecAgg round's: a masked input has no norm the server could see).
    norms_round = active if active is not None and active.accepted and not active.secure else next(
        (r for r in recent if r.accepted and not r.secure), None)
    last = next((r for r in recent if r.state in ("closed", "abandoned")), None)
    return {
        "time": time.time(),
        "model_version": db.latest_version(conn),
        "round": _round_json(conn, active) if active else None,
        "last_round": _round_json(conn, last) if last else None,
        "rounds": [{"id": r.id, "state": r.state, "model_version": r.model_version, "accepted": r.accepted,
                    "assigned": r.assigned, "goal_clients": r.goal_clients, "min_clients": r.min_clients,
                    "outcome": r.outcome, "published_version": r.published_version,
                    "aggregate_seconds": r.aggregate_seconds, "publish_seconds": r.publish_seconds,
                    "opened_at": r.opened_at, "closed_at": r.closed_at} for r in recent],
        "versions": versions,
        "update_norms": {"round_id": norms_round.id, "clip_norm": norms_round.clip_norm,
                         "norms": db.update_norms(conn, norms_round.id)} if norms_round else None,
        "rejected_total": db.rejections(conn),
        "totals": db.totals(conn),
        "worker": {"holds_lock": state.worker.lock.held, "last_error": state.worker.last_error},
        "privacy": privacy_json(conn, state.config),
        "config": state.config.public_json(),
    }


@bp.get("/v1/status")
def status():
    """The public status (no token): see the module docstring for what it holds and why."""
    return _uncached(public_status(db.get_db(), server().config))


@bp.get("/v1/admin/status")
def admin_status():
    """The operator's status: the public fields and every detail.

    :raise 401: missing or wrong admin token.
    """
    require_admin()
    return _uncached(operator_status(db.get_db(), server()))


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition of this app's registry.

    :raise 401: missing or wrong admin token.
    """
    require_admin()
    return Response(generate_latest(server().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/")
def dashboard():
    """The operator's page; its script and style are files under /static/ (see aggregator/dashboard.py)."""
    return Response(dashboard_html(), mimetype="text/html")


@bp.post("/v1/admin/rounds/current/end")
def end_round():
    """Move the open round's deadline to now: it closes if it has its minimum, else is abandoned.
    A secure-aggregation round's current stage closes now instead, with the devices that acted
    (aggregator/secagg_stages.py); the answer names the stages closed (`secagg_closed`).

    :raise 401: missing or wrong admin token.
    :raise 409: no round is open (`no_open_round`).
    """
    require_admin()
    conn = db.get_db()
    closed = None
    with db.transaction(conn):
        active = db.active_round(conn)
        if active is None or active.state != "open":
            raise Conflict("no round is open", code="no_open_round")
        if active.secure:
            closed = secagg_stages.advance(conn, active.id, time.time(), end_now=True)
        else:
            db.update_round(conn, active.id, deadline=min(active.deadline, time.time()))
    server().worker.wake()
    extra = {} if closed is None else {"secagg_closed": closed}
    return jsonify(round_id=active.id, accepted=active.accepted, min_clients=active.min_clients, **extra)


@bp.post("/v1/admin/evaluations")
def post_evaluation():
    """Attach evaluation metrics to a version, for the dashboard: `{"model_version": v, "eval": {...}}`.

    :raise 400: the body lacks a version or a flat object of finite numbers.
    :raise 401: missing or wrong admin token.
    :raise 404: unknown version (`unknown_version`).
    """
    require_admin()
    evaluation = EvaluationRequest.from_json(json_body())
    version, metrics_ = evaluation.model_version, evaluation.eval
    conn = db.get_db()
    with db.transaction(conn):
        if not db.set_eval(conn, version, json.dumps(metrics_)):
            raise NotFound(f"model version {version} does not exist", code="unknown_version")
    return jsonify(model_version=version, eval=metrics_)
