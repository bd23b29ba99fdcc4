"""JSON for the errors the HTTP server answers itself, before the app sees a request.

A header line too long, too many headers, a malformed request line: Werkzeug's server (Python's
`http.server`) and gunicorn refuse these while parsing, each with its own HTML page, so the app's
error handlers never run. A device or script acting on `{"error": code}` must get the same JSON
(and the same security headers) there too. Neither server has a setting for its error format
(gunicorn issue #993), so each gets a small subclass: `JsonErrorRequestHandler` for Werkzeug's
`make_server(request_handler=...)`, `JsonErrorThreadWorker` as gunicorn's `worker_class`.

Refusing is the servers' own decision and stays so: gunicorn's `limit_request_line` (4094 bytes)
and `limit_request_field_size` (8190), `http.server`'s 65536-byte lines and 100 headers.
"""

from __future__ import annotations

import json
import logging

from gunicorn.util import write_nonblock
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.serving import WSGIRequestHandler

from aggregator.errors import http_error_code
from aggregator.headers import SECURITY_HEADERS

log = logging.getLogger(__name__)

GENERIC_500 = "the server failed to handle this request"


def error_json(status: int, message: str) -> bytes:
    """The body of an error the server answers itself: the app's `{"error", "message"}` shape."""
    return json.dumps({"error": http_error_code(status), "message": message if status < 500 else GENERIC_500}).encode()


def error_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection."""
    body = error_json(status, message)
    head = [f"HTTP/1.1 {status} {reason}", "Connection: close", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in SECURITY_HEADERS.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class JsonErrorRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler with `http.server`'s error page replaced by JSON."""

    def send_error(self, code, message=None, explain=None):
        short, long = self.responses.get(code, ("Error", ""))
        self.log_error("code %d, message %s", code, message or short)
        self.send_response(code, message or short)
        self.send_header("Connection", "close")
        body = b""
        if code >= 200 and code not in (204, 205, 304):
            body = error_json(code, explain or message or long or short)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)


class _Captured:
    """Stands in for the client socket while gunicorn writes its HTML error, to learn its status."""

    def __init__(self):
        self.data = b""

    def gettimeout(self):
        return 0.0

    def sendall(self, data):
        self.data += data

    send = sendall


class JsonErrorThreadWorker(ThreadWorker):
    """gunicorn's threaded worker, answering its own parse errors (414, 431, 400, ...) in JSON.

    gunicorn keeps deciding the status and logging; only the page it writes is replaced.
    """

    def handle_error(self, req, client, addr, exc):
        captured = _Captured()
        super().handle_error(req, captured, addr, exc)
        status_line = captured.data.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        try:
            status, reason = int(status_line[1]), status_line[2] if len(status_line) > 2 else "Error"
        except (IndexError, ValueError):
            status, reason = 500, "Internal Server Error"
        try:
            write_nonblock(client, error_response(status, reason, f"{reason}: {exc}"))
        except OSError:
            log.debug("could not send the error answer to %s", addr)
