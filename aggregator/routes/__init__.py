"""HTTP routes, one blueprint per concern. Each route decodes the request into the dataclasses of
`fedkb_core.protocol`, calls the logic, and encodes the answer; none does maths."""

from __future__ import annotations

from flask import current_app, request

from aggregator import auth, db
from aggregator.errors import BadRequest, Unauthorized


def server():
    """The app's `ServerState`."""
    return current_app.extensions["fedkb"]


def authenticate_device() -> str:
    """The id of the device whose bearer token came with the request.

    Raises:
        Unauthorized: no bearer token, an unknown device or a wrong token (401, `unauthorized`).
    """
    token = auth.bearer_token(request.headers.get("Authorization"))
    device_id = auth.device_id_of(token) if token else None
    stored = db.device_token_hash(db.get_db(), device_id) if device_id else None
    if stored is None or not auth.token_matches(token, stored):
        raise Unauthorized("missing or invalid device token", headers={"WWW-Authenticate": 'Bearer realm="fedkb"'})
    return device_id


def require_admin() -> None:
    """Raises: Unauthorized: the admin bearer token is missing or wrong."""
    token = auth.bearer_token(request.headers.get("Authorization"))
    if not auth.secret_matches(token, server().config.admin_token):
        raise Unauthorized("missing or invalid admin token", headers={"WWW-Authenticate": 'Bearer realm="fedkb-admin"'})


def json_body():
    """The request's JSON body. Raises: BadRequest: the body is not JSON."""
    body = request.get_json(silent=True)
    if body is None:
        raise BadRequest("expected a JSON body (Content-Type: application/json)")
    return body
