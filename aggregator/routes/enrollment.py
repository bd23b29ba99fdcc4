"""Enrollment: a device that knows the fleet's secret gets an id and a bearer token."""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify

from aggregator import auth, db
from aggregator.errors import Forbidden
from aggregator.routes import json_body, server
from fedkb_core.protocol import EnrollRequest, EnrollResponse, to_json

bp = Blueprint("enrollment", __name__)
log = logging.getLogger(__name__)


@bp.post("/v1/devices")
def enroll():
    """Register a device.

    :raise 400: the body is not an `EnrollRequest`.
    :raise 403: wrong enrollment secret (`bad_enrollment_secret`).
    """
    request = EnrollRequest.from_json(json_body())
    if not auth.secret_matches(request.enrollment_secret, server().config.enrollment_secret):
        raise Forbidden("wrong enrollment secret", code="bad_enrollment_secret")
    device_id = auth.new_device_id()
    token = auth.new_token(device_id)
    conn = db.get_db()
    with db.transaction(conn):
        db.add_device(conn, device_id, auth.hash_token(token), request.platform[:64])
    log.info("device enrolled", extra={"device_id": device_id, "platform": request.platform[:64]})
    return jsonify(to_json(EnrollResponse(device_id=device_id, token=token))), 201
