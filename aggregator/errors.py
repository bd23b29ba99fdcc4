"""Domain exceptions of the server and the one handler that turns them into JSON.

Routes and logic raise an `ApiError` subclass (or let `fedkb_core.wire.UpdateRejected` and
`fedkb_core.protocol.ProtocolError` through); `register_error_handlers` maps every one of them, and
Werkzeug's own 404/405/413, to `{"error": CODE, "message": TEXT}` with a stable code, so a device
can act on `error` without parsing prose.
"""

from __future__ import annotations

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from fedkb_core.protocol import ProtocolError
from fedkb_core.wire import UpdateRejected


class ApiError(Exception):
    """A request the server refuses; `code` is stable, `message` is for humans."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    """The request is well formed but the round's state does not allow it (409)."""

    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class LengthRequired(ApiError):
    status, code = 411, "length_required"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


# Wire codes that are conflicts with the round rather than bad bytes.
_UPDATE_STATUS = {"stale_model_version": 409, "round_closed": 409, "already_submitted": 409}

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
               413: "payload_too_large", 414: "uri_too_long", 415: "unsupported_media_type",
               417: "expectation_failed", 429: "too_many_requests", 431: "request_header_fields_too_large",
               500: "internal_error", 501: "not_implemented", 503: "unavailable",
               505: "http_version_not_supported"}


def http_error_code(status: int) -> str:
    """The stable `error` code of an HTTP status the server answers without a more precise one."""
    return _HTTP_CODES.get(status, f"http_{status}")


def _body(code: str, message: str, status: int, headers: dict | None = None):
    response = jsonify(error=code, message=message)
    response.status_code = status
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


def register_error_handlers(app: Flask) -> None:
    """Install the single place where exceptions become HTTP answers."""

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError):
        return _body(err.code, err.message, err.status, err.headers)

    @app.errorhandler(UpdateRejected)
    def _rejected(err: UpdateRejected):
        return _body(err.code, err.message, _UPDATE_STATUS.get(err.code, 400))

    @app.errorhandler(ProtocolError)
    def _protocol(err: ProtocolError):
        return _body("bad_request", str(err), 400)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException):
        status = err.code or 500
        return _body(http_error_code(status), err.description or err.name, status)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        current_app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return _body("internal_error", "the server failed to handle this request", 500)
