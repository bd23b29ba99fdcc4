"""A gunicorn thread worker that receives each request whole before a thread serves it.

gunicorn's `gthread` worker hands a connection to a request thread as soon as its first bytes
arrive, and the thread then reads the rest with blocking reads and no deadline: a handful of
clients sending one header line per second hold every thread, and nobody else is answered
(gunicorn's deployment guide asks for a buffering proxy in front for exactly this reason). This
worker does the buffering proxy's part itself, in its event loop, where a waiting connection costs
no thread:

- the request line and headers must arrive within `header_timeout` seconds of the connection
  (or of the previous response on a kept-alive one); a request line or header block larger than
  gunicorn's limits allow goes to a thread at once, whose parser refuses it;
- a body with a Content-Length must then arrive within `body_timeout` seconds; it is collected in
  the loop too (up to `max_request_bytes` each, while the worker holds less than
  `max_buffered_bytes` of unfinished requests);
- only then does a thread parse and serve the request, from memory. A request the loop does not
  collect whole (chunked, `Expect: 100-continue`, over the memory budget) gets a thread whose
  socket reads share the same deadline, so it too ends in bounded time;
- gunicorn's `worker_connections` bounds how many connections a worker holds at once.

A connection that misses a deadline gets a JSON 408 and is closed; gunicorn's own parse errors
are answered in JSON too (`JsonErrorThreadWorker`). Plain HTTP/1.1 only (fedkb serve terminates
no TLS; a proxy in front does). Tested in tests/test_aggregator_slow_clients.py.
"""

from __future__ import annotations

import dataclasses
import errno
import selectors
import socket
import time
from functools import partial

from gunicorn.workers.gthread import TConn

from aggregator.server_errors import JsonErrorThreadWorker, error_response

_HEADER_END = b"\r\n\r\n"
STOP_LINGER = 0.25


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """How long and how much one connection may take before a thread serves it."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_header_bytes: int = 64 * 1024  # beyond: to a thread, whose parser applies gunicorn's limits
    max_request_bytes: int = 64 * 1024 * 1024  # a larger claimed body goes to the app at once (to refuse)
    max_buffered_bytes: int = 256 * 1024 * 1024  # unfinished requests one worker holds in memory


@dataclasses.dataclass
class _Collecting:
    """One connection's request as it arrives: the bytes up to the end of its headers in `buf`
    (searched for the blank line), everything after it as the chunks `recv` returned. A body is
    never copied into one growing buffer: that re-copies megabytes per upload while holding the GIL."""

    deadline: float
    buf: bytearray = dataclasses.field(default_factory=bytearray)
    needed: int | None = None  # total bytes of the request once its headers are in
    head_end: int = 0  # where the headers end in `buf`, once they are in
    rest: list[bytes] = dataclasses.field(default_factory=list)  # the body's bytes, as received
    size: int = 0  # bytes received in all

    def take(self) -> tuple[bytes, list[bytes]]:
        """(the request line and headers, the bytes after them in order)."""
        if self.needed is None:
            return bytes(self.buf), self.rest
        view = memoryview(self.buf)
        return bytes(view[: self.head_end]), [bytes(view[self.head_end :]), *self.rest]


def worker_class(limits: ConnectionLimits) -> type:
    """A `BufferingThreadWorker` subclass bound to `limits` (gunicorn takes a class, and forks)."""
    return type("FedkbWorker", (BufferingThreadWorker,), {"limits": limits})


class BufferingThreadWorker(JsonErrorThreadWorker):
    limits = ConnectionLimits()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._collecting: dict[TConn, _Collecting] = {}
        self._buffered = 0

    # -- connections waiting for their request, in the event loop --------------------------------

    def accept(self, listener):
        if self.cfg.is_ssl:  # not this worker's job (see the module docstring)
            return super().accept(listener)
        try:
            client_sock, client_addr = listener.accept()
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._collect(TConn(self.cfg, client_sock, client_addr, listener.getsockname()))

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection's next request is collected like a new connection's."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._collect(conn)

    def _collect(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        self._collecting[conn] = _Collecting(deadline=time.monotonic() + self.limits.header_timeout)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, _sock) -> None:
        state = self._collecting[conn]
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._drop(conn)
        if not data:  # the client is done sending: with its headers in, the app answers what came
            return self._dispatch(conn) if state.needed is not None else self._drop(conn)
        state.size += len(data)
        self._buffered += len(data)
        if state.needed is not None:
            state.rest.append(data)
        else:
            state.buf += data
            end = state.buf.find(_HEADER_END)
            if end < 0:
                line_limit = self.cfg.limit_request_line + 2  # gunicorn's, with its CRLF (0: no limit)
                line_too_long = line_limit > 2 and len(state.buf) > line_limit and b"\r\n" not in state.buf[:line_limit]
                if len(state.buf) > self.limits.max_header_bytes or line_too_long:
                    self._dispatch(conn)  # gunicorn's parser refuses it (414, 431, 400), in JSON
                return
            length = _plain_body_length(bytes(state.buf[:end]))
            if length is None or length > self.limits.max_request_bytes:
                # chunked, 100-continue, malformed or too large: a thread (the parser, the app) decides
                return self._dispatch(conn)
            state.head_end = end + len(_HEADER_END)
            state.needed = state.head_end + length
            state.deadline = time.monotonic() + self.limits.body_timeout
        if state.size >= state.needed or self._buffered > self.limits.max_buffered_bytes:
            self._dispatch(conn)

    def _dispatch(self, conn: TConn) -> None:
        """Hand the collected bytes to a thread; its further reads end at the body deadline."""
        state = self._collecting.pop(conn)
        self.poller.unregister(conn.sock)
        self._buffered -= state.size
        conn.data_ready = True  # gthread's handle() need not wait for the first bytes
        conn.fedkb_prefetched = state.take()
        conn.fedkb_deadline = time.monotonic() + self.limits.body_timeout
        self.enqueue_req(conn)

    def _drop(self, conn: TConn) -> None:
        state = self._collecting.pop(conn, None)
        if state is not None:
            self._buffered -= state.size
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.nr_conns -= 1
        conn.close()

    def _refuse(self, conn: TConn, status: int, reason: str, message: str) -> None:
        """Best-effort JSON answer on a non-blocking socket, then close (a slow reader loses it)."""
        try:
            conn.sock.send(error_response(status, reason, message))
        except OSError:
            pass
        self._drop(conn)

    def murder_pending(self):
        """Each loop pass (at most 1 s apart): close connections past their deadline; all of them
        when the worker is stopping (none has a request a thread started on)."""
        super().murder_pending()
        now = time.monotonic()
        for conn, state in list(self._collecting.items()):
            if not self.alive:
                self._drop(conn)
            elif state.deadline <= now:
                what = "headers" if state.needed is None else "body"
                self._refuse(conn, 408, "Request Timeout", f"the request {what} did not arrive in time")

    def _cap_keepalive(self, deadline):
        """A stopping worker keeps idle kept-alive connections `STOP_LINGER` s, not gunicorn's 2 s: a
        request already on its way is still answered, and a restart is not held up by idle clients."""
        super()._cap_keepalive(min(deadline, time.monotonic() + STOP_LINGER))

    # -- in a request thread ----------------------------------------------------------------------

    def handle(self, conn):
        prefetched = getattr(conn, "fedkb_prefetched", None)
        if prefetched is not None:
            conn.fedkb_prefetched = None
            conn.sock.setblocking(True)
            conn.init()  # the HTTP/1.1 parser, once per connection
            head, rest = prefetched
            prefetched = None  # the socket below keeps the body's only copy
            # Only the headers go into the parser's buffer: it copies that buffer whole for every
            # header line it parses (about 20 copies of a 4.6 MB upload). The body is read as from
            # the socket, a chunk at a time, before any byte still on the socket.
            conn.parser.unreader.unread(head)
            conn.parser.unreader.sock = _DeadlineSocket(conn.sock, conn.fedkb_deadline, received=rest)
            rest = None
        return super().handle(conn)


class _DeadlineSocket:
    """A socket whose reads all end by one deadline (a per-read timeout alone lets a client that
    trickles a byte at a time hold the thread forever)."""

    def __init__(self, sock: socket.socket, deadline: float, *, received: list[bytes] = ()):
        self._sock = sock
        self._deadline = deadline
        # Already read, served first: joined once, then handed out in the sizes gunicorn asks for
        # (up to 1 MiB), each byte copied once more.
        self._received = memoryview(b"".join(received))
        self._offset = 0

    def recv(self, size: int) -> bytes:
        if self._offset < len(self._received):
            chunk = bytes(self._received[self._offset : self._offset + size])
            self._offset += len(chunk)
            if self._offset == len(self._received):
                self._received, self._offset = memoryview(b""), 0  # all served: let it go
            return chunk
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        previous = self._sock.gettimeout()
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(size)
        finally:
            self._sock.settimeout(previous)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _plain_body_length(head: bytes) -> int | None:
    """The body length of a request the loop can collect whole: 0 without a body, the
    Content-Length when it is one plain number; None for anything the parser must judge."""
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        name, value = name.strip().lower(), value.strip()
        if name == b"transfer-encoding" or (name == b"expect" and value.lower() == b"100-continue"):
            return None
        if name == b"content-length":
            if not value.isdigit() or not value.isascii() or (length is not None and int(value) != length):
                return None
            length = int(value)
    return length or 0
