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
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import requests

from fedkb_core.errors import FedkbError
from fedkb_core.manifest import Manifest, ManifestError
from fedkb_core.protocol import CheckinRequest, CheckinResponse, DeviceState, EnrollRequest, EnrollResponse, to_json

log = logging.getLogger(__name__)

DROP_CODES = ("round_closed", "stale_model_version")  # too late: drop the update, say nothing


class ServerError(FedkbError):
    """The server answered with an error (`status`, its JSON `code`, its message)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"server answered {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ServerUnavailable(FedkbError):
    """The server could not be reached (or kept failing with 5xx) after every retry."""


class DownloadTooLarge(FedkbError):
    """A download went past the size it was allowed; it was stopped and its partial file removed."""


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
    """

    def __init__(self, base_url: str, *, credentials: Credentials | None = None, retry: RetryPolicy = RetryPolicy(),
                 timeout: float = 30.0, session: requests.Session | None = None, seed: int | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.base_url = base_url.rstrip("/")
        self.credentials, self.retry, self.timeout = credentials, retry, timeout
        self._http = session or requests.Session()
        self._rng = random.Random(seed)
        self._sleep = sleep
        self.retries = 0  # retries made over this client's life (observability, tests)

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
                 passthrough: tuple[int, ...] = (), stream: bool = False, **kwargs) -> tuple[requests.Response, int]:
        """Send with retries; return (response, attempts) for a status in `ok` or `passthrough`.

        Raises:
            ServerError: any other 4xx (not retried: sending the same request again would not help).
            ServerUnavailable: network errors or 5xx on every attempt.
        """
        url = f"{self.base_url}{path}"
        headers = {**self._headers(auth), **kwargs.pop("headers", {})}
        problem = ""
        for attempt in range(self.retry.max_attempts):
            retry_after = 0.0
            try:
                response = self._http.request(method, url, headers=headers, timeout=self.timeout, stream=stream,
                                              **kwargs)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code in ok or response.status_code in passthrough:
                    return response, attempt + 1
                if response.status_code < 500 and response.status_code != 429:
                    raise _server_error(response)
                problem = f"HTTP {response.status_code}"
                retry_after = _retry_after(response.headers.get("Retry-After"), self.retry.max_retry_after)
                response.close()
            if attempt + 1 < self.retry.max_attempts:
                delay = max(backoff_delay(attempt, self.retry, self._rng), retry_after)
                log.info("%s %s failed (%s); retry %d in %.2fs", method, path, problem, attempt + 1, delay)
                self.retries += 1
                self._sleep(delay)
        raise ServerUnavailable(f"{method} {url}: no answer after {self.retry.max_attempts} attempts ({problem})")

    # API --------------------------------------------------------------------------------------
    def enroll(self, enrollment_secret: str, *, platform: str = "linux") -> Credentials:
        """Join the fleet; the returned credentials are also kept by this client.

        Raises:
            ServerError: 403 `bad_enrollment_secret` for a wrong secret.
        """
        body = to_json(EnrollRequest(enrollment_secret=enrollment_secret, platform=platform))
        response, _ = self._request("POST", "/v1/devices", auth=False, json=body)
        answer = EnrollResponse(**{k: response.json()[k] for k in ("device_id", "token")})
        self.credentials = Credentials(answer.device_id, answer.token)
        return self.credentials

    def checkin(self, state: DeviceState, model_version: int | None) -> CheckinResponse:
        """Ask for work: a task for the open round, or how long to wait."""
        body = to_json(CheckinRequest(model_version=model_version, state=state))
        response, _ = self._request("POST", "/v1/checkin", json=body)
        return CheckinResponse.from_json(response.json())

    def manifest(self, version: int | None = None) -> tuple[Manifest, bytes]:
        """The manifest of `version` (default: the latest), parsed and as raw bytes."""
        path = "/v1/models/latest" if version is None else f"/v1/models/{version}/manifest.json"
        response, _ = self._request("GET", path, auth=False)
        try:
            return Manifest.from_json(response.json(), where=path), response.content
        except ValueError as err:  # ManifestError for the model store: a bad download, not a crash
            raise ManifestError(f"{path}: the server sent a manifest that is not JSON ({err})") from None

    def download(self, version: int, filename: str, dest: Path, *, max_bytes: int | None = None) -> int:
        """Stream one file of a version into `dest` (fsynced); return its size in bytes.

        Raises:
            DownloadTooLarge: the body went past `max_bytes` (the manifest's size): reading stops
                there, so a body that never ends cannot fill the disk. Not retried.
        """
        path = f"/v1/models/{version}/{filename}"
        for attempt in range(self.retry.max_attempts):
            response, _ = self._request("GET", path, auth=False, stream=True)
            try:
                size = 0
                with open(dest, "wb") as f:
                    for chunk in response.iter_content(1 << 16):
                        size += len(chunk)
                        if max_bytes is not None and size > max_bytes:
                            raise DownloadTooLarge(f"GET {path}: more than the {max_bytes} bytes expected; stopped")
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                return size
            except DownloadTooLarge:
                Path(dest).unlink(missing_ok=True)
                raise
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
                # The connection broke mid-body: fetch the whole file again.
                if attempt + 1 == self.retry.max_attempts:
                    raise ServerUnavailable(f"GET {path}: transfer kept breaking ({err})") from None
                self.retries += 1
                self._sleep(backoff_delay(attempt, self.retry, self._rng))
            finally:
                response.close()
        raise AssertionError("unreachable")

    def upload(self, round_id: int, body: bytes) -> UploadResult:
        """Post an encoded update (fedkb_core.wire) for a round, retrying until the server answers.

        Raises:
            ServerUnavailable: every attempt failed on the network or with 5xx (the caller
                keeps the body and tries again later: the server recognises a repeat).
        """
        response, attempts = self._request(
            "POST", f"/v1/rounds/{round_id}/updates", data=body, ok=(200,), passthrough=(400, 403, 404, 409, 413),
            headers={"Content-Type": "application/octet-stream"})
        answer = _json_or_empty(response)
        if response.status_code == 200:
            status = "duplicate" if answer.get("duplicate") else "accepted"
            return UploadResult(status, attempts, update_id=answer.get("update_id"), server_norm=answer.get("update_norm"))
        code, message = answer.get("error", f"http_{response.status_code}"), answer.get("message", response.text[:200])
        if code in DROP_CODES:
            log.info("round %d: update dropped (%s: %s)", round_id, code, message)
            return UploadResult("dropped", attempts, code=code, message=message)
        log.warning("round %d: update rejected (%s: %s)", round_id, code, message)
        return UploadResult("rejected", attempts, code=code, message=message)


def _json_or_empty(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _server_error(response: requests.Response) -> ServerError:
    body = _json_or_empty(response)
    return ServerError(response.status_code, str(body.get("error", f"http_{response.status_code}")),
                       str(body.get("message", response.text[:200])))


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return min(cap, max(0.0, float(value))) if value else 0.0
    except ValueError:  # an HTTP date: not worth parsing for a hint
        return 0.0
