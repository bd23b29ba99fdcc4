"""One emulated device's work in one round, run inside an executor worker process.

The device does what a phone does: fetch the task's model version over HTTP and verify every
file against the manifest, set the global weights, train with the LiteRT `train` signature on
its own text, compute and clip the update, and upload it as safetensors with its bearer token.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from datasets.windows import iterate_batches, make_windows
from fedkb.clipping import clip_by_global_norm
from fedkb.manifest import MANIFEST_FILE, TRAINABLE_FILE, Manifest, load_manifest, verify_files
from fedkb.protocol import RoundTask
from fedkb.wire import UpdateMetadata, encode_update


@dataclasses.dataclass(frozen=True)
class DeviceJob:
    """Everything a worker needs; plain data so it pickles to another process."""

    server_url: str
    device_id: str
    token: str
    task: dict  # RoundTask as JSON
    tokens: np.ndarray  # this client's training token stream (stays "on the device")
    cache_dir: str  # where this worker keeps downloaded model versions
    seed: int
    num_threads: int = 1


@dataclasses.dataclass(frozen=True)
class JobResult:
    device_id: str
    status: str  # "accepted", "duplicate", "rejected:<code>", "late", "failed:<reason>", "no_data"
    num_examples: int = 0
    update_norm: float = 0.0
    upload_bytes: int = 0
    train_seconds: float = 0.0
    mean_loss: float = float("nan")


_interpreters: dict[str, tuple] = {}  # per worker process: model dir -> (runners, global weights)


def _session():
    import requests

    session = requests.Session()
    return session


def fetch_version(server_url: str, version: int, cache_dir: Path, session) -> Path:
    """Download and verify one version into the cache (atomically; reused when present)."""
    final = Path(cache_dir) / f"v{version}"
    if (final / MANIFEST_FILE).exists():
        return final
    tmp = Path(cache_dir) / f".v{version}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    base = f"{server_url}/v1/models/{version}"
    response = session.get(f"{base}/{MANIFEST_FILE}", timeout=30)
    response.raise_for_status()
    manifest = Manifest.from_json(response.json())
    for name in manifest.files:
        data = session.get(f"{base}/{name}", timeout=60)
        data.raise_for_status()
        (tmp / name).write_bytes(data.content)
    (tmp / MANIFEST_FILE).write_bytes(response.content)
    verify_files(tmp, load_manifest(tmp))
    try:
        os.rename(tmp, final)
    except OSError:  # another worker published the same version first
        pass
    return final


def _runners(model_dir: Path, num_threads: int):
    key = str(model_dir)
    if key not in _interpreters:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(model_dir / TRAINABLE_FILE), num_threads=num_threads)
        runners = {name: interpreter.get_signature_runner(name) for name in ("train", "get_weights", "set_weights")}
        global_weights = {k: v.copy() for k, v in runners["get_weights"]().items()}
        _interpreters.clear()  # one version at a time per worker
        _interpreters[key] = (interpreter, runners, global_weights)
    return _interpreters[key]


def client_windows(tokens: np.ndarray, *, seq_len: int, max_examples: int, seed: int):
    """The windows a device trains on in one round: all, or a seeded sample of max_examples."""
    windows = make_windows(tokens, seq_len)
    if len(windows) > max_examples:
        rng = np.random.default_rng(seed)
        windows = windows.take(np.sort(rng.choice(len(windows), max_examples, replace=False)))
    return windows


def local_update(runners, global_weights: dict, tokens: np.ndarray, task: RoundTask, manifest: Manifest,
                 seed: int) -> tuple[dict, int, float]:
    """Train from the global weights on local windows; return (delta, num_examples, mean loss)."""
    runners["set_weights"](**global_weights)
    windows = client_windows(tokens, seq_len=manifest.seq_len, max_examples=task.max_examples, seed=seed)
    losses = []
    lr = np.float32(task.learning_rate)
    for batch in iterate_batches(windows, batch_size=manifest.batch_size, seed=seed, epochs=task.epochs):
        losses.append(float(runners["train"](x=batch.x, y=batch.y, mask=batch.mask, lr=lr)["loss"]))
    local = runners["get_weights"]()
    delta = {name: (local[name] - global_weights[name]).astype(np.float32) for name in global_weights}
    return delta, len(windows), float(np.mean(losses)) if losses else float("nan")


def run_device_job(job: DeviceJob) -> JobResult:
    """Fetch, train, clip, upload. Errors become a result, never an exception across processes."""
    task = RoundTask.from_json(job.task)
    if len(job.tokens) < 2:
        return JobResult(job.device_id, "no_data")
    session = _session()
    try:
        model_dir = fetch_version(job.server_url, task.model_version, Path(job.cache_dir), session)
        manifest = load_manifest(model_dir)
        _, runners, global_weights = _runners(model_dir, job.num_threads)
        started = time.monotonic()
        delta, num_examples, mean_loss = local_update(runners, global_weights, job.tokens, task, manifest, job.seed)
        seconds = time.monotonic() - started
        clipped, norm = clip_by_global_norm(delta, task.clip_norm)
        body = encode_update(clipped, UpdateMetadata(
            round_id=task.round_id, model_version=task.model_version, device_id=job.device_id,
            num_examples=num_examples, clip_norm=task.clip_norm, update_norm=norm, encoding=task.encoding))
        status = _upload(session, job, task, body)
        return JobResult(job.device_id, status, num_examples, norm, len(body), seconds, mean_loss)
    except Exception as err:  # a device failing is data for the report, not a crash of the fleet
        return JobResult(job.device_id, f"failed:{type(err).__name__}: {err}")
    finally:
        session.close()


def _upload(session, job: DeviceJob, task: RoundTask, body: bytes, attempts: int = 5) -> str:
    import requests

    url = f"{job.server_url}/v1/rounds/{task.round_id}/updates"
    headers = {"Authorization": f"Bearer {job.token}", "Content-Type": "application/octet-stream"}
    delay = 0.2
    for attempt in range(attempts):
        try:
            response = session.post(url, data=body, headers=headers, timeout=60)
        except requests.ConnectionError:
            response = None
        if response is not None and response.status_code < 500:
            if response.ok:
                return "duplicate" if response.json().get("duplicate") else "accepted"
            code = response.json().get("error", str(response.status_code))
            return "late" if code in ("round_closed", "stale_model_version") else f"rejected:{code}"
        time.sleep(delay * (1 + np.random.default_rng(job.seed + attempt).random()))
        delay *= 2
    return "failed:upload retries exhausted"
