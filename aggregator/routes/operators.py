"""Operator endpoints: status JSON, Prometheus metrics, the dashboard page and admin actions.

Reading (status, metrics, dashboard) needs no token: put the server behind your network policy.
Changing anything (`/v1/admin/...`) needs the admin bearer token.
"""

from __future__ import annotations

import dataclasses
import json
import time

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aggregator import db
from aggregator.dashboard import DASHBOARD_HTML
from aggregator.errors import Conflict, NotFound
from aggregator.routes import json_body, require_admin, server
from fedkb_core.protocol import EvaluationRequest

bp = Blueprint("operators", __name__)


def _round_json(conn, round_) -> dict:
    body = dataclasses.asdict(round_)
    body["rejected"] = db.rejections(conn, round_.id)
    body["accepted_updates"] = round_.accepted
    return body


@bp.get("/v1/status")
def status():
    """The active round and its counts, recent rounds with their outcomes, and version history."""
    state, conn = server(), db.get_db()
    active = db.active_round(conn)
    recent = db.recent_rounds(conn, 20)
    versions = db.versions(conn)
    for v in versions:
        raw = v.pop("eval_json")
        v["eval"] = json.loads(raw) if raw else None
    # The chart shows the norms of the active round, or of the last finished one while it is empty.
    norms_round = active if active is not None and active.accepted else next(
        (r for r in recent if r.accepted), None)
    return jsonify(
        time=time.time(),
        model_version=db.latest_version(conn),
        round=_round_json(conn, active) if active else None,
        last_round=_round_json(conn, next((r for r in recent if r.state in ("closed", "abandoned")), None))
        if any(r.state in ("closed", "abandoned") for r in recent) else None,
        rounds=[{"id": r.id, "state": r.state, "model_version": r.model_version, "accepted": r.accepted,
                 "assigned": r.assigned, "goal_clients": r.goal_clients, "min_clients": r.min_clients,
                 "outcome": r.outcome, "published_version": r.published_version,
                 "aggregate_seconds": r.aggregate_seconds, "publish_seconds": r.publish_seconds,
                 "opened_at": r.opened_at, "closed_at": r.closed_at} for r in recent],
        versions=versions,
        update_norms={"round_id": norms_round.id, "clip_norm": norms_round.clip_norm,
                      "norms": db.update_norms(conn, norms_round.id)} if norms_round else None,
        rejected_total=db.rejections(conn),
        totals=db.totals(conn),
        worker={"holds_lock": state.worker.lock.held, "last_error": state.worker.last_error},
        config=state.config.public_json(),
    )


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(server().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


@bp.get("/")
def dashboard():
    """A one-page dashboard that polls /v1/status (no external scripts)."""
    return Response(DASHBOARD_HTML, mimetype="text/html")


@bp.post("/v1/admin/rounds/current/end")
def end_round():
    """Move the open round's deadline to now: it closes if it has its minimum, else is abandoned.

    :raise 401: missing or wrong admin token.
    :raise 409: no round is open (`no_open_round`).
    """
    require_admin()
    conn = db.get_db()
    with db.transaction(conn):
        active = db.active_round(conn)
        if active is None or active.state != "open":
            raise Conflict("no round is open", code="no_open_round")
        db.update_round(conn, active.id, deadline=min(active.deadline, time.time()))
    server().worker.wake()
    return jsonify(round_id=active.id, accepted=active.accepted, min_clients=active.min_clients)


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
