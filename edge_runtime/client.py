"""The device's HTTP client for the aggregator (API in `fedkb_core.protocol`).

Phones lose the network all the time, so every call retries network errors and 5xx answers
with capped exponential backoff and jitter (the "equal jitter" of Brooker, "Exponential Backoff
and Jitter", AWS Architecture Blog, 2015): the wait before retry n is uniform in
[c/2, c] with c = min(max_delay, base_delay · 2^n), so waits keep growing and a fleet that failed
together does not come back together. A `Retry-After` header, when longer, wins.

Uploads are idempotent: the same bytes are re-sent on every attempt, and the server answers a
repeat of an update it already stored as a duplicate of the first, so an update whose answer
was lost is never counted twice. A "round closed" or "stale model version" answer means the
update came too late to matter: it is dropped quietly (status "dropped"), not raised.

Every client counts what it moves (`Traffic`: requests, request body bytes sent, response body
bytes read), as the bytes go: a phone's data plan pays for those, and the simulation reports them
per device and round.

Model downloads are conditional where that saves bytes: a manifest the device already holds is
asked for with `If-None-Match` (its sha256, the server's strong ETag), and a 304 answer is
accepted only as the answer to that question: one for a request that was not conditional, with
another ETag, or declaring a body other than what the device holds (a `Content-Length` other
than 0 or its size, RFC 9110 §8.6, or a `Transfer-Encoding`) is a `BadReply`. A 304 has no body, so
the connection it came on is closed unread: bytes a server put after it are never taken for the
next answer.

Secure aggregation's stages (docs/secure_aggregation.md, "Over HTTP") are four more calls:
`secagg_keys`, `secagg_status`, `secagg_shares`, `secagg_unmask`, each answered with a
`SecAggStatus` (the round's stage and this device's next action); the masked vector goes through
`upload` like any update. Their 4xx answers (409 `secagg_conflict`, `secagg_wrong_stage`, 400 with
the cohort's code, 403 `no_task`) are `ServerError`s, as every other refusal.

Every reply is read as a stream against the device's own byte budget (`bounds.DownloadLimits`):
a JSON answer, a manifest or a file that goes past it is cut off there, so an endless or huge
body costs the device at most the budget in memory or on disk. A reply that is not the JSON the
protocol describes is a `BadReply`, never an exception from deep inside the parser.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import requests

from edge_runtime.bounds import DownloadLimits
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import Manifest, ManifestError
from fedkb_core.protocol import (CheckinRequest, CheckinResponse, DeviceState, EnrollRequest, EnrollResponse,
                                 ProtocolError, to_json)
from fedkb_core.secagg.messages import KeyAdvertisement, SecAggStatus, ShareUpload, UnmaskResponse
from fedkb_core.signing import MAX_SIGNATURE_BYTES

log = logging.getLogger(__name__)

# Too late: drop the update, say nothing. `secagg_wrong_stage`: a masked upload after the round's
# input stage closed (docs/secure_aggregation.md).
DROP_CODES = ("round_closed", "stale_model_version", "secagg_wrong_stage")


class ServerError(FedkbError):
    """The server answered with an error (`status`, its JSON `code`, its message)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"server answered {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ServerUnavailable(FedkbError):
    """The server could not be reached (or kept failing with 5xx) after every retry."""


class DownloadTooLarge(FedkbError):
    """A download went past the size it was allowed; it was stopped and its partial file removed."""


class BadReply(FedkbError):
    """The server answered, but not with what the protocol says: too large, not JSON, wrong fields.

    `code` is "reply_too_large" or "bad_reply" (the cycle's reason)."""

    def __init__(self, message: str, *, code: str = "bad_reply"):
        super().__init__(message)
        self.code = code


_CREDENTIAL = re.compile(r"[A-Za-z0-9._~+/=-]{1,512}")  # what may go into an Authorization header


@dataclasses.dataclass
class Traffic:
    """What a client moved over HTTP: requests sent (every attempt), request body bytes sent with
    an answer, response body bytes read. Headers are not counted (a few hundred bytes a request)."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def since(self, earlier: "Traffic") -> "Traffic":
        """What moved after the snapshot `earlier` (`dataclasses.replace(traffic)`)."""
        return Traffic(self.requests - earlier.requests, self.bytes_sent - earlier.bytes_sent,
                       self.bytes_received - earlier.bytes_received)


# What enrollment returns is what the device keeps: its id and bearer token.
Credentials = EnrollResponse


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up on a call."""

    max_attempts: int = 6
    base_delay: float = 0.5  # seconds before the first retry (then doubling)
    max_delay: float = 60.0
    max_retry_after: float = 300.0  # cap on a server's Retry-After

    def __post_init__(self):
        if self.max_attempts < 1 or self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError("need max_attempts >= 1 and 0 <= base_delay <= max_delay")


def backoff_delay(retry: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Seconds to wait before retry number `retry` (0-based): equal jitter over a capped doubling."""
    cap = min(policy.max_delay, policy.base_delay * (2.0 ** retry))
    return cap / 2 + rng.uniform(0.0, cap / 2)


@dataclasses.dataclass(frozen=True)
class UploadResult:
    """The outcome of an upload: "accepted", "duplicate", "dropped" (too late) or "rejected"."""

    status: str
    attempts: int
    update_id: int | None = None
    code: str | None = None
    message: str | None = None
    server_norm: float | None = None  # the update's norm as the server measured it

    @property
    def counted(self) -> bool:
        """Whether the server holds this update (a duplicate is the earlier attempt's success)."""
        return self.status in ("accepted", "duplicate")


class ServerClient:
    """Talks to one aggregator.

    Args:
        base_url: e.g. `http://127.0.0.1:8080`.
        credentials: the device's id and token (set after `enroll`).
        retry: the retry policy for network errors and 5xx.
        timeout: seconds per request (connect and read).
        seed: seeds the jitter (deterministic tests); None draws from the OS.
        sleep: how to wait (injectable; tests count the waits).
        limits: the byte budgets for replies (JSON, manifest).
    """

    def __init__(self, base_url: str, *, credentials: Credentials | None = None, retry: RetryPolicy = RetryPolicy(),
                 timeout: float = 30.0, session: requests.Session | None = None, seed: int | None = None,
                 sleep: Callable[[float], None] = time.sleep, limits: DownloadLimits = DownloadLimits()):
        self.base_url = base_url.rstrip("/")
        self.credentials, self.retry, self.timeout, self.limits = credentials, retry, timeout, limits
        self._http = session or requests.Session()
        self._rng = random.Random(seed)
        self._sleep = sleep
        self.retries = 0  # retries made over this client's life (observability, tests)
        self.traffic = Traffic()  # what it moved over its life

    def close(self) -> None:
        self._http.close()

    # Transport --------------------------------------------------------------------------------
    def _headers(self, auth: bool) -> dict:
        if not auth:
            return {}
        if self.credentials is None:
            raise FedkbError("this device is not enrolled yet (no credentials)")
        return {"Authorization": f"Bearer {self.credentials.token}"}

    def _request(self, method: str, path: str, *, auth: bool = True, ok: tuple[int, ...] = (200, 201),
                 passthrough: tuple[int, ...] = (), **kwargs) -> tuple[requests.Response, int]:
        """Send with retries; return (response, attempts) for a status in `ok` or `passthrough`.

        The body is not read yet (always streamed): read it with `_read_capped` / `_json_reply`
        and close the response.

        Raises:
            ServerError: any other 4xx (not retried: sending the same request again would not help).
            ServerUnavailable: network errors or 5xx on every attempt.
        """
        url = f"{self.base_url}{path}"
        headers = {**self._headers(auth), **kwargs.pop("headers", {})}
        problem = ""
        for attempt in range(self.retry.max_attempts):
            retry_after = 0.0
            self.traffic.requests += 1
            try:
                response = self._http.request(method, url, headers=headers, timeout=self.timeout, stream=True,
                                              **kwargs)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                self.traffic.bytes_sent += len(response.request.body or b"")
                if response.status_code in ok or response.status_code in passthrough:
                    return response, attempt + 1
                if response.status_code < 500 and response.status_code != 429:
                    raise self._server_error(response)
                problem = f"HTTP {response.status_code}"
                retry_after = _retry_after(response.headers.get("Retry-After"), self.retry.max_retry_after)
                response.close()
            if attempt + 1 < self.retry.max_attempts:
                delay = max(backoff_delay(attempt, self.retry, self._rng), retry_after)
                log.info("%s %s failed (%s); retry %d in %.2fs", method, path, problem, attempt + 1, delay)
                self.retries += 1
                self._sleep(delay)
        raise ServerUnavailable(f"{method} {url}: no answer after {self.retry.max_attempts} attempts ({problem})")

    # Bounded reading -------------------------------------------------------------------------
    def _read_capped(self, response: requests.Response, limit: int, what: str) -> bytes:
        """The body, or BadReply("reply_too_large") as soon as it passes `limit` bytes."""
        try:
            parts, size = [], 0
            for chunk in response.iter_content(1 << 16):
                size += len(chunk)
                self.traffic.bytes_received += len(chunk)
                if size > limit:
                    raise BadReply(f"{what}: the reply is larger than the {limit} bytes this device reads; "
                                   "stopped", code="reply_too_large")
                parts.append(chunk)
            return b"".join(parts)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as err:
            raise ServerUnavailable(f"{what}: the reply broke off ({type(err).__name__})") from None
        finally:
            response.close()

    def _json_reply(self, response: requests.Response, what: str, *, limit: int | None = None):
        """The body parsed as JSON (at most `limit` bytes, default `max_json_bytes`)."""
        body = self._read_capped(response, self.limits.max_json_bytes if limit is None else limit, what)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as err:  # RecursionError: "[[[[..." nested past the stack
            raise BadReply(f"{what}: the reply is not JSON ({type(err).__name__}: {str(err)[:100]})") from None

    def _json_or_empty(self, response: requests.Response, what: str) -> dict:
        try:
            body = self._json_reply(response, what)
        except BadReply:
            return {}
        return body if isinstance(body, dict) else {}

    def _server_error(self, response: requests.Response) -> ServerError:
        body = self._json_or_empty(response, f"HTTP {response.status_code}")
        return ServerError(response.status_code, _short(body.get("error"), f"http_{response.status_code}"),
                           _short(body.get("message"), ""))

    # API --------------------------------------------------------------------------------------
    def enroll(self, enrollment_secret: str, *, platform: str = "linux") -> Credentials:
        """Join the fleet; the returned credentials are also kept by this client.

        Raises:
            ServerError: 403 `bad_enrollment_secret` for a wrong secret.
            BadReply: an answer without a usable device id and token.
        """
        body = to_json(EnrollRequest(enrollment_secret=enrollment_secret, platform=platform))
        response, _ = self._request("POST", "/v1/devices", auth=False, json=body)
        answer = self._json_reply(response, "POST /v1/devices")
        values = [answer.get(k) if isinstance(answer, dict) else None for k in ("device_id", "token")]
        if not all(isinstance(v, str) and _CREDENTIAL.fullmatch(v) for v in values):
            raise BadReply("POST /v1/devices: the enrollment answer has no valid device_id and token "
                           "(1-512 characters of A-Z a-z 0-9 . _ ~ + / = -)")
        self.credentials = Credentials(*values)
        return self.credentials

    def checkin(self, state: DeviceState, model_version: int | None) -> CheckinResponse:
        """Ask for work: a task for the open round, or how long to wait.

        Raises:
            BadReply: an answer that is not a check-in response (too large, not JSON, bad fields).
        """
        body = to_json(CheckinRequest(model_version=model_version, state=state))
        response, _ = self._request("POST", "/v1/checkin", json=body)
        answer = self._json_reply(response, "POST /v1/checkin")
        try:
            return CheckinResponse.from_json(answer)
        except (ProtocolError, TypeError, ValueError) as err:
            raise BadReply(f"POST /v1/checkin: {str(err)[:200]}") from None

    def manifest(self, version: int | None = None, *,
                 held: tuple[str, int] | None = None) -> tuple[Manifest, bytes] | None:
        """The manifest of `version` (default: the latest), parsed and as raw bytes; None when
        the device holds it already: the sha256 of the manifest bytes it holds (`held`: sha256,
        size) is sent as `If-None-Match`, and the server answered 304 for exactly that ETag.

        Raises:
            ManifestError: not a manifest (too large, not JSON, missing fields), or a 304 that does
                not answer the question asked (see the module docstring): a bad download.
        """
        path = "/v1/models/latest" if version is None else f"/v1/models/{version}/manifest.json"
        headers = {"If-None-Match": f'"{held[0]}"'} if held else {}
        response, _ = self._request("GET", path, auth=False, ok=(200,), passthrough=(304,), headers=headers)
        if response.status_code == 304:
            try:
                self._check_not_modified(response, f"GET {path}", held)
            except BadReply as err:
                raise ManifestError(str(err)) from None
            return None
        try:
            raw = self._read_capped(response, self.limits.max_manifest_bytes, f"GET {path}")
            body = json.loads(raw)
        except BadReply as err:
            raise ManifestError(str(err)) from None
        except (ValueError, RecursionError) as err:
            raise ManifestError(f"{path}: the server sent a manifest that is not JSON ({type(err).__name__})") from None
        if not isinstance(body, dict):
            raise ManifestError(f"{path}: the manifest is not a JSON object")
        return Manifest.from_json(body, where=path), raw

    def manifest_signature(self, version: int) -> bytes | None:
        """The version's `manifest.sig`, or None when the server has none (404)."""
        path = f"/v1/models/{version}/manifest.sig"
        response, _ = self._request("GET", path, auth=False, ok=(200,), passthrough=(404,))
        if response.status_code == 404:
            response.close()
            return None
        return self._read_capped(response, MAX_SIGNATURE_BYTES, f"GET {path}")

    def _check_not_modified(self, response: requests.Response, what: str, held: tuple[str, int] | None) -> None:
        """A 304 is the answer "you hold it already" to an `If-None-Match` for `held` (sha256, size).

        Raises:
            BadReply: a 304 to a request that was not conditional, for another ETag, or declaring
                a body other than the one held.
        """
        etag, length = response.headers.get("ETag"), response.headers.get("Content-Length")
        chunked = "Transfer-Encoding" in response.headers
        response.raw.close()  # unread, with its connection (see the module docstring)
        response.close()
        if held is None:
            raise BadReply(f"{what}: the server answered 304 Not Modified, but this device holds no copy "
                           "and did not ask conditionally")
        sha256, size = held
        if etag is not None and etag.strip().removeprefix("W/") != f'"{sha256}"':
            raise BadReply(f"{what}: the server answered 304 Not Modified for ETag {_short(etag, '', 80)}, "
                           f'but this device asked about "{sha256}"')
        if chunked or (length is not None and length.strip() not in ("0", str(size))):
            declared = "chunked" if chunked else f"Content-Length {_short(length, '', 20)}"
            raise BadReply(f"{what}: the server answered 304 Not Modified with a body ({declared}; the copy "
                           f"held is {size} bytes): not HTTP, nothing of it used")

    def signing_key(self) -> bytes:
        """The server's model signing public key (PEM): what a device with none configured pins."""
        response, _ = self._request("GET", "/v1/models/signing-key", auth=False, ok=(200,))
        return self._read_capped(response, 16 * 1024, "GET /v1/models/signing-key")

    def download(self, version: int, filename: str, dest: Path, *, max_bytes: int | None = None,
                 sha256: str | None = None) -> int:
        """Stream one file of a version into `dest` (fsynced); return its size in bytes.

        A transfer that breaks off resumes where it stopped rather than starting over: the retry
        asks for the rest (`Range`) if the file is still the one with `sha256` (`If-Range`: a
        server holding other bytes sends the whole file instead). The manifest's sha256 checks the
        whole file afterwards either way.

        Raises:
            DownloadTooLarge: the body went past `max_bytes` (the manifest's size): reading stops
                there, so a body that never ends cannot fill the disk. Not retried.
            BadReply: a 304 (the device never asks for a file conditionally: it holds it or not),
                or a 206 that does not start where the device asked.
        """
        path = f"/v1/models/{version}/{filename}"
        size = 0
        with open(dest, "wb") as f:
            for attempt in range(self.retry.max_attempts):
                resume = {"Range": f"bytes={size}-", "If-Range": f'"{sha256}"'} if size and sha256 else {}
                response, _ = self._request("GET", path, auth=False, ok=(200, 206), passthrough=(304,), headers=resume)
                if response.status_code == 304:  # never asked conditionally: a file the device does not hold
                    self._check_not_modified(response, f"GET {path}", None)
                try:
                    if response.status_code == 206:
                        start = _range_start(response.headers.get("Content-Range"))
                        if start != size:
                            raise BadReply(f"GET {path}: asked for the bytes from {size}, the server sent "
                                           f"{_short(response.headers.get('Content-Range'), 'no Content-Range', 80)}")
                    elif size:  # the whole file again (the server did not resume)
                        f.seek(0)
                        f.truncate()
                        size = 0
                    for chunk in response.iter_content(1 << 16):
                        size += len(chunk)
                        self.traffic.bytes_received += len(chunk)
                        if max_bytes is not None and size > max_bytes:
                            raise DownloadTooLarge(f"GET {path}: more than the {max_bytes} bytes expected; stopped")
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                    return size
                except (DownloadTooLarge, BadReply):
                    Path(dest).unlink(missing_ok=True)
                    raise
                except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
                    # The connection broke mid-body: ask for the rest.
                    if attempt + 1 == self.retry.max_attempts:
                        raise ServerUnavailable(f"GET {path}: transfer kept breaking ({err})") from None
                    self.retries += 1
                    self._sleep(backoff_delay(attempt, self.retry, self._rng))
                finally:
                    response.close()
        raise AssertionError("unreachable")

    # Secure aggregation ----------------------------------------------------------------------
    def secagg_keys(self, advertisement: KeyAdvertisement) -> SecAggStatus:
        """Stage 0: advertise the round's two public keys (`POST /v1/rounds/{id}/secagg/keys`).

        Raises:
            ServerError: 409 `secagg_conflict` (other keys already advertised), `secagg_wrong_stage`,
                400 with the cohort's code (`duplicate_key`, `reused_key`, ...), 403 `no_task`.
            BadReply: an answer that is not a `SecAggStatus` for this round.
        """
        return self._secagg("POST", advertisement.round_id, "/keys", advertisement.to_json())

    def secagg_status(self, round_id: int) -> SecAggStatus:
        """What this device must do now in round `round_id` (`GET /v1/rounds/{id}/secagg`)."""
        return self._secagg("GET", round_id, "", None)

    def secagg_shares(self, upload: ShareUpload) -> SecAggStatus:
        """Stage 1: the boxes sealed to each neighbour (`POST /v1/rounds/{id}/secagg/shares`)."""
        return self._secagg("POST", upload.round_id, "/shares", upload.to_json())

    def secagg_unmask(self, response: UnmaskResponse) -> SecAggStatus:
        """Stage 3: the shares the server asked for (`POST /v1/rounds/{id}/secagg/unmask`)."""
        return self._secagg("POST", response.round_id, "/unmask", response.to_json())

    def _secagg(self, method: str, round_id: int, suffix: str, body: dict | None) -> SecAggStatus:
        path = f"/v1/rounds/{round_id}/secagg{suffix}"
        kwargs = {} if body is None else {"json": body}
        response, _ = self._request(method, path, ok=(200, 201), **kwargs)
        answer = self._json_reply(response, f"{method} {path}")
        try:
            status = SecAggStatus.from_json(answer)
        except (ProtocolError, TypeError, ValueError) as err:
            raise BadReply(f"{method} {path}: {str(err)[:200]}") from None
        if status.round_id != round_id:
            raise BadReply(f"{method} {path}: the answer is for round {status.round_id}")
        return status

    def upload(self, round_id: int, body: bytes) -> UploadResult:
        """Post an encoded update (fedkb_core.wire) for a round, retrying until the server answers.

        Raises:
            ServerUnavailable: every attempt failed on the network or with 5xx (the caller
                keeps the body and tries again later: the server recognises a repeat).
        """
        response, attempts = self._request(
            "POST", f"/v1/rounds/{round_id}/updates", data=body, ok=(200,), passthrough=(400, 403, 404, 409, 413),
            headers={"Content-Type": "application/octet-stream"})
        answer = self._json_or_empty(response, f"POST /v1/rounds/{round_id}/updates")
        if response.status_code == 200:
            status = "duplicate" if answer.get("duplicate") is True else "accepted"
            return UploadResult(status, attempts, update_id=_number(answer.get("update_id"), int),
                                server_norm=_number(answer.get("update_norm"), float))
        code, message = _short(answer.get("error"), f"http_{response.status_code}"), _short(answer.get("message"), "")
        if code in DROP_CODES:
            log.info("round %d: update dropped (%s: %s)", round_id, code, message)
            return UploadResult("dropped", attempts, code=code, message=message)
        log.warning("round %d: update rejected (%s: %s)", round_id, code, message)
        return UploadResult("rejected", attempts, code=code, message=message)


def _short(value, default: str, limit: int = 300) -> str:
    """A server-given string as the device logs it: printable, bounded."""
    if not isinstance(value, str):
        return default
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


def _number(value, kind):
    """A server-given number, or None when it is not a finite one of `kind`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    return float(value) if math.isfinite(value) else None


def _range_start(value: str | None) -> int | None:
    """The first byte of a `Content-Range: bytes FIRST-LAST/SIZE`, or None if it is not one."""
    match = re.fullmatch(r"bytes (\d{1,18})-\d{1,18}/(\d{1,18}|\*)", (value or "").strip())
    return int(match[1]) if match else None


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return min(cap, max(0.0, float(value))) if value else 0.0
    except ValueError:  # an HTTP date: not worth parsing for a hint
        return 0.0
