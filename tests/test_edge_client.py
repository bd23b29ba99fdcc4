"""The device's HTTP client against a real aggregator on loopback, through a faulty proxy.

Waits are injected (`sleep=delays.append`), so retries cost no time and every delay is checked
against the equal-jitter bounds instead of a clock.
"""

from __future__ import annotations

import random
import socket

import pytest
import requests

from edge_runtime.client import (RetryPolicy, ServerClient, ServerError, ServerUnavailable, UploadResult,
                                 backoff_delay)
from fedkb_core.protocol import DeviceState
from fedkb_core.wire import UpdateMetadata, encode_update
from tests.fixtures_aggregator import (ADMIN, SECRET, TINY_SHAPES, make_server, random_deltas,  # noqa: F401
                                       status, weights_model)
from tests.fixtures_edge import FaultProxy, proxy  # noqa: F401

FAST = RetryPolicy(max_attempts=6, base_delay=0.1, max_delay=0.4)
READY = DeviceState(idle=True, charging=True, unmetered=True, battery=90.0)


@pytest.fixture
def server(make_server, weights_model):
    return make_server(weights_model, min_clients=1, goal_clients=5)


@pytest.fixture
def delays() -> list[float]:
    return []


@pytest.fixture
def device(proxy, delays):
    """An enrolled client (through the proxy) that records its waits instead of sleeping."""
    client = ServerClient(proxy.url, retry=FAST, seed=1, sleep=delays.append)
    client.enroll(SECRET)
    yield client
    client.close()


def _task(client):
    answer = client.checkin(READY, None)
    assert answer.action == "train", answer
    return answer.task


def _body(client, task, **changes) -> bytes:
    fields = dict(round_id=task.round_id, model_version=task.model_version, device_id=client.credentials.device_id,
                  num_examples=12, clip_norm=task.clip_norm, update_norm=0.5, encoding="float32")
    fields.update(changes)
    return encode_update(random_deltas(TINY_SHAPES, seed=3, scale=0.01), UpdateMetadata(**fields))


def _bounds(retry: int, policy: RetryPolicy) -> tuple[float, float]:
    cap = min(policy.max_delay, policy.base_delay * 2 ** retry)
    return cap / 2, cap


# Backoff ----------------------------------------------------------------------------------

def test_backoff_is_equal_jitter_over_a_capped_doubling():
    policy = RetryPolicy(base_delay=0.5, max_delay=8.0)
    rng = random.Random(0)
    for retry in range(10):
        low, high = _bounds(retry, policy)
        samples = [backoff_delay(retry, policy, rng) for _ in range(300)]
        assert all(low <= d <= high for d in samples), retry
        # Spread over the whole upper half, not stuck at one end: a fleet does not come back together.
        assert min(samples) < low + 0.1 * (high - low) and max(samples) > high - 0.1 * (high - low)
    assert _bounds(9, policy) == (4.0, 8.0)  # capped


@pytest.mark.parametrize("kwargs", [dict(max_attempts=0), dict(base_delay=-1), dict(base_delay=2, max_delay=1)])
def test_retry_policy_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_5xx_is_retried_with_growing_jittered_waits(device, proxy, delays, server):
    task = _task(device)
    proxy.fail_uploads = 3
    result = device.upload(task.round_id, _body(device, task))
    assert (result.status, result.attempts) == ("accepted", 4)
    assert len(delays) == 3 and device.retries == 3
    for retry, delay in enumerate(delays):
        low, high = _bounds(retry, FAST)
        assert low <= delay <= high, (retry, delay)
    rng = random.Random(1)  # the client's seed: the waits are reproducible
    assert delays == [backoff_delay(n, FAST, rng) for n in range(3)]
    assert (proxy.uploads_seen(), proxy.uploads_forwarded) == (4, 1)
    assert status(server.url)["totals"]["accepted"] == 1


def test_server_unavailable_after_max_attempts_of_5xx(device, proxy, delays, server):
    task = _task(device)
    proxy.fail_uploads = 100
    with pytest.raises(ServerUnavailable, match="6 attempts"):
        device.upload(task.round_id, _body(device, task))
    assert len(delays) == 5 and proxy.uploads_seen() == 6 and proxy.uploads_forwarded == 0
    assert status(server.url)["totals"]["accepted"] == 0


def test_server_unavailable_after_max_attempts_of_network_errors(delays):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ServerClient(f"http://127.0.0.1:{port}", retry=RetryPolicy(max_attempts=4, base_delay=0.1, max_delay=1),
                          sleep=delays.append, timeout=5)
    with pytest.raises(ServerUnavailable, match="ConnectionError"):
        client.enroll(SECRET)
    assert len(delays) == 3 and client.retries == 3 and client.credentials is None


# 4xx answers ------------------------------------------------------------------------------

def test_4xx_is_not_retried(proxy, delays, device):
    stranger = ServerClient(proxy.url, retry=FAST, sleep=delays.append)
    before = len(proxy.requests)
    with pytest.raises(ServerError) as refused:
        stranger.enroll("not the secret")
    assert (refused.value.status, refused.value.code) == (403, "bad_enrollment_secret")
    assert len(proxy.requests) == before + 1 and delays == []

    from edge_runtime.client import Credentials

    stranger.credentials = Credentials(device.credentials.device_id, "forged-token")
    with pytest.raises(ServerError) as refused:
        stranger.checkin(READY, None)
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert len(proxy.requests) == before + 2 and delays == []


def test_an_upload_the_server_refuses_is_rejected_without_retrying(device, proxy, delays, server):
    task = _task(device)
    body = encode_update({"other": random_deltas({"other": (3,)}, seed=0)["other"]}, UpdateMetadata(
        round_id=task.round_id, model_version=task.model_version, device_id=device.credentials.device_id,
        num_examples=3, clip_norm=1.0, update_norm=0.1))
    result = device.upload(task.round_id, body)
    assert (result.status, result.code, result.attempts, result.counted) == ("rejected", "weight_mismatch", 1, False)
    assert delays == [] and proxy.uploads_seen() == 1
    # Uploading to a round the device holds no task for is refused the same way.
    assert device.upload(task.round_id + 1, _body(device, task, round_id=task.round_id + 1)).code == "unknown_round"
    assert status(server.url)["totals"]["accepted"] == 0


# Idempotent uploads -----------------------------------------------------------------------

def test_an_upload_whose_answer_is_lost_is_counted_once(device, proxy, delays, server):
    task = _task(device)
    body = _body(device, task)
    proxy.drop_after_forward = 1  # the server stores the update; the answer never comes back
    result = device.upload(task.round_id, body)
    assert (result.status, result.attempts, result.counted) == ("duplicate", 2, True)
    assert proxy.uploads_forwarded == 2 and len(delays) == 1
    s = status(server.url)
    assert s["round"]["accepted_updates"] == 1 and s["totals"]["accepted"] == 1
    again = device.upload(task.round_id, body)  # a later retry of the same bytes is still one update
    assert (again.status, again.update_id) == ("duplicate", result.update_id)
    assert status(server.url)["totals"]["accepted"] == 1


def test_a_different_second_update_for_the_same_round_is_rejected(device, server):
    task = _task(device)
    assert device.upload(task.round_id, _body(device, task)).status == "accepted"
    other = device.upload(task.round_id, _body(device, task, num_examples=13))
    assert (other.status, other.code) == ("rejected", "already_submitted")
    assert status(server.url)["totals"]["accepted"] == 1


# Too late: dropped quietly -----------------------------------------------------------------

def test_round_closed_answer_drops_the_update(device, server, delays):
    task = _task(device)
    r = requests.post(f"{server.url}/v1/admin/rounds/current/end", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    result = device.upload(task.round_id, _body(device, task))
    assert result == UploadResult("dropped", 1, code="round_closed", message=result.message)
    assert not result.counted and delays == []
    assert status(server.url)["totals"]["accepted"] == 0


def test_stale_model_version_answer_drops_the_update(device, server, delays):
    task = _task(device)
    result = device.upload(task.round_id, _body(device, task, model_version=task.model_version + 1))
    assert (result.status, result.code, result.attempts) == ("dropped", "stale_model_version", 1)
    assert not result.counted and delays == []
    assert status(server.url)["totals"]["accepted"] == 0
