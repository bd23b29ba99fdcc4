"""`fedkb simulate`: an emulated fleet of real devices against a real aggregator.

Every emulated phone is the edge runtime's own `Device` (`simulation.device_job`). Per round, on
a simulated clock: every device's daily pattern says whether it is idle, charging and on Wi-Fi;
the eligible ones wake up in random order and run their cycle's selection half (check-in) until
the server stops handing out tasks (it over-selects ~130 %); the selected run the work half in
parallel worker processes (train with LiteRT, upload), and some stop being eligible before they
finish and drop out. The server aggregates and publishes the next version, which the fleet
downloads over HTTP like a device, into the edge runtime's model store, and evaluates.

With `--secure-aggregation` every phone runs every stage of every round with its own participant
folder in its home, in phases (`simulation.secagg_round`): check-in and key advertisement,
sharing, the worker pool's train-mask-upload step, unmasking, and a last step once the round has
ended; the report gains each round's `secagg` counts.

Every phone keeps its own model store and HTTP client, and the report counts, per round, what
each phone's client moved (requests, request and response body bytes) in both halves of its
cycle (`simulation.report.traffic_summary`); the fleet's own downloads for evaluation are not a
phone's and are not counted.

The fleet knows its server only by URL, enrollment secret and admin token (`ServerAccess`):
never where the server keeps its state, whose files it must not read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

from datasets.prepared import PreparedData
from datasets.tokenizer import load_tokenizer, word_start_table
from edge_runtime.client import ServerClient, Traffic
from edge_runtime.device import CycleReport, Device
from edge_runtime.eligibility import can_continue
from edge_runtime.litert_model import TrainableCache
from edge_runtime.model_store import ModelStore
from fedkb_core.durable import sha256_file
from fedkb_core.errors import FedkbError
from fedkb_core.manifest import Manifest
from fedkb_core.protocol import RoundTask
from fedkb_core.training_config import TRAINING, TrainingConfig
from fedkb_core.update_encoding import SECAGG
from model.evaluation import EvalConfig, evaluate_weights
from model.weights import Weights
from simulation.availability import HOUR, AvailabilityConfig, draw_fleet
from simulation.device_job import (POLICY, DeviceJob, FleetClockState, JobResult, SimulatedClock, emulated_device,
                                   job_steps, run_device_job)
from simulation.executor import InlineExecutor, ProcessExecutor
from simulation.report import Participation, RoundRecord, traffic_summary
from simulation.secagg_round import SecAggRound
from simulation.shared_files import prune, share

log = logging.getLogger(__name__)

# The differential-privacy settings a fleet passes to its server (TrainingConfig's dp_* fields).
PRIVACY_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingConfig) if f.name.startswith("dp_"))
# How devices upload (`fedkb serve`'s --update-encoding and --update-bits).
UPDATE_FIELDS = ("update_encoding", "update_bits")
# Secure aggregation (`fedkb serve`'s --secure-aggregation and --secagg-* flags).
SECAGG_FIELDS = ("secure_aggregation", "secagg_tolerated_dropout", "secagg_degree", "secagg_stage_timeout")

__all__ = ["POLICY", "PRIVACY_FIELDS", "SECAGG_FIELDS", "UPDATE_FIELDS", "FleetConfig", "ServerAccess", "ServerProcess", "run_fleet"]


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """Round and device settings of a simulation."""

    clients: int = 300
    # The round, device and server settings default to `fedkb serve`'s (fedkb_core/training_config.py).
    clients_per_round: int = TRAINING.goal_clients
    rounds: int = 30
    min_clients: int | None = None  # default: the server's rule, half the goal
    over_selection: float = TRAINING.over_selection
    device_lr: float = TRAINING.device_lr
    device_epochs: int = TRAINING.device_epochs
    max_examples: int = TRAINING.device_max_examples  # windows per device per round
    clip_norm: float = TRAINING.clip_norm
    server_lr: float = TRAINING.server_lr  # FedAdam's; plain FedAvg (sgd, no momentum) is 1.0
    server_momentum: float = TRAINING.server_momentum  # sgd only: FedAvgM (Hsu et al., 2019)
    # FedAdam (Reddi et al., 2021; β₁ 0.9, β₂ 0.99, ε 1e-3): measured on Shakespeare it beat FedAvgM
    # (momentum 0.7) at 30 rounds and, at 300 rounds, the 1-epoch centralized baseline (README).
    server_optimizer: str = TRAINING.server_optimizer
    # Differential privacy, as `fedkb serve`'s --dp-* flags (PRIVACY_FIELDS; off by default).
    dp_noise_multiplier: float | None = TRAINING.dp_noise_multiplier
    dp_adaptive_clipping: bool = TRAINING.dp_adaptive_clipping
    dp_target_quantile: float = TRAINING.dp_target_quantile
    dp_clip_learning_rate: float = TRAINING.dp_clip_learning_rate
    dp_clipped_count_stddev: float | None = TRAINING.dp_clipped_count_stddev
    dp_mechanism: str = TRAINING.dp_mechanism
    dp_min_separation: int = TRAINING.dp_min_separation
    dp_tree_restart_period: int | None = TRAINING.dp_tree_restart_period
    dp_population: int | None = TRAINING.dp_population
    dp_delta: float | None = TRAINING.dp_delta
    dp_target_epsilon: float | None = TRAINING.dp_target_epsilon
    update_encoding: str = TRAINING.update_encoding
    update_bits: int | None = TRAINING.update_bits
    # Secure aggregation, as `fedkb serve`'s --secure-aggregation and --secagg-* flags (SECAGG_FIELDS):
    # every phone runs every stage (simulation.secagg_round).
    secure_aggregation: bool = TRAINING.secure_aggregation
    secagg_tolerated_dropout: float = TRAINING.secagg_tolerated_dropout
    secagg_degree: int | None = TRAINING.secagg_degree
    secagg_stage_timeout: float | None = TRAINING.secagg_stage_timeout
    round_hours: float = 1.0  # simulated time between rounds
    start_hour_utc: float = 22.0
    job_minutes: float = 10.0  # simulated duration of a device's job (dropout window)
    workers: int = 2
    seed: int = 0
    eval: EvalConfig = EvalConfig()
    availability: AvailabilityConfig = AvailabilityConfig()

    def validate(self, num_training_clients: int) -> None:
        if self.rounds < 1:
            raise FedkbError(f"--rounds must be at least 1, got {self.rounds}")
        if self.clients < 1:
            raise FedkbError(f"--clients must be at least 1, got {self.clients}")
        if self.clients > num_training_clients:
            raise FedkbError(f"--clients {self.clients} exceeds the {num_training_clients} training clients of the data")
        if not 1 <= self.clients_per_round <= self.clients:
            raise FedkbError(f"--clients-per-round must be between 1 and --clients ({self.clients}), "
                             f"got {self.clients_per_round}")
        if self.workers < 1:
            raise FedkbError(f"--workers must be at least 1, got {self.workers}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_arguments(config: FleetConfig) -> list[str]:
    """The `fedkb serve` flags that make the server run this fleet's rounds (the round deadline is
    an hour: the fleet ends each round itself once its devices have reported)."""
    args = ["--goal-clients", str(config.clients_per_round), "--over-selection", str(config.over_selection),
            "--round-timeout", "3600", "--clip-norm", str(config.clip_norm), "--server-lr", str(config.server_lr),
            "--server-momentum", str(config.server_momentum), "--server-optimizer", config.server_optimizer,
            "--device-lr", str(config.device_lr), "--device-epochs", str(config.device_epochs),
            "--device-max-examples", str(config.max_examples)]
    for name in UPDATE_FIELDS + PRIVACY_FIELDS + SECAGG_FIELDS:
        value = getattr(config, name)
        if name in SECAGG_FIELDS and value == getattr(TRAINING, name):
            continue  # the server's default already
        if value is True:
            args.append(_flag(name))
        elif value is not None and value is not False:
            args += [_flag(name), str(value)]
    return args + (["--min-clients", str(config.min_clients)] if config.min_clients else [])


def _flag(field: str) -> str:
    return "--target-epsilon" if field == "dp_target_epsilon" else "--" + field.replace("_", "-")


class ServerAccess:
    """What a fleet knows of its server: the URL, the fleet's enrollment secret and the
    operator's admin token. Nothing of where the server keeps its files.

    `operator_url` (default: `url`) is where the fleet's own traffic goes (status, ending a
    round, the versions it evaluates): the phones use `url`, so a proxy there sees only theirs."""

    def __init__(self, url: str, secret: str, admin: str, *, operator_url: str | None = None):
        self.url, self.secret, self.admin = url.rstrip("/"), secret, admin
        self.operator_url = (operator_url or url).rstrip("/")

    def status(self) -> dict:
        return requests.get(f"{self.operator_url}/v1/admin/status",
                            headers={"Authorization": f"Bearer {self.admin}"}, timeout=10).json()

    def end_round(self) -> None:
        requests.post(f"{self.operator_url}/v1/admin/rounds/current/end",
                      headers={"Authorization": f"Bearer {self.admin}"}, timeout=10)

    def stop(self) -> None:
        """A server the fleet did not start is not the fleet's to stop."""


class ServerProcess(ServerAccess):
    """A real `fedkb serve` on loopback, stopped on exit."""

    def __init__(self, *, state: Path, init_model: Path, log_path: Path, config: FleetConfig):
        self.port = _free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", secrets.token_urlsafe(16), secrets.token_urlsafe(16))
        args = [sys.executable, "-m", "fedkb", "-q", "serve", "--state", str(state), "--init-model", str(init_model),
                "--port", str(self.port), "--plain-logs", *serve_arguments(config)]
        env = {**os.environ, "FEDKB_ENROLLMENT_SECRET": self.secret, "FEDKB_ADMIN_TOKEN": self.admin}
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FedkbError(f"the aggregator exited at start (status {self.process.returncode}); see {log_path}")
            try:
                if requests.get(f"{self.url}/v1/status", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise FedkbError(f"the aggregator did not answer within 120 s; see {log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()



@dataclasses.dataclass
class _Phone:
    index: int
    client_id: str
    home: Path
    device: Device  # the selection half of its cycle runs here, in the fleet's process


class _Versions:
    """The fleet's view of the published versions: downloaded over HTTP into the edge runtime's
    model store (the one its phones' check-ins fill), evaluated from what was downloaded."""

    def __init__(self, root: Path, client: ServerClient):
        self.store, self.client = ModelStore(root), client
        self._trainable = TrainableCache()

    def manifest(self, version: int) -> Manifest:
        return self.store.fetch(self.client, version)

    def weights(self, version: int):
        """The version's weights as the devices compute with them (LiteRT's, from the downloaded file)."""
        self.manifest(version)
        return self._trainable.load(self.store.version_dir(version))[1]


def _enroll(server: ServerAccess, client_ids: list[str], data: PreparedData, patterns, clock: SimulatedClock,
            config: FleetConfig, homes: Path, session: requests.Session) -> list[_Phone]:
    """One edge-runtime device per client, with its own model store, enrolled with the fleet's
    secret (one shared HTTP session: a keep-alive connection per device would hold a server
    thread each; each device still has its own client, which counts its traffic)."""
    phones = []
    for i, cid in enumerate(client_ids):
        home = homes / f"{i:05d}"
        device = emulated_device(server.url, home, data.train[cid], session=session,
                                 state=FleetClockState(patterns[i], clock, config.availability))
        device.ensure_enrolled(server.secret)
        phones.append(_Phone(i, cid, home, device))
    return phones


def _select(eligible: list[_Phone], order, secagg: SecAggRound | None = None) -> list[tuple[_Phone, RoundTask]]:
    """The eligible phones check in in `order` until the server says the round is full; with secure
    aggregation each selected phone advertises its keys right after its check-in."""
    selected = []
    for i in order:
        answer = eligible[i].device.request_task()
        if isinstance(answer, RoundTask):
            selected.append((eligible[i], answer))
            if secagg is not None and answer.encoding == SECAGG:
                secagg.advertise(eligible[i].index, eligible[i].device, answer)
        elif isinstance(answer, CycleReport) and "round_full" in answer.reasons:
            break
    return selected


def _secagg_stage(server: ServerAccess) -> str | None:
    """The open round's SecAgg stage from the operator's status (`round.secagg.stage`), if shown."""
    secagg = (server.status().get("round") or {}).get("secagg")
    return secagg.get("stage") if isinstance(secagg, dict) else None


def _plus(traffic: Traffic, job: JobResult) -> Traffic:
    """A phone's check-in traffic plus its job's."""
    return Traffic(traffic.requests + job.requests, traffic.bytes_sent + job.bytes_uploaded,
                   traffic.bytes_received + job.bytes_downloaded)


def draw_clients(rng: np.random.Generator, train: dict[str, np.ndarray], count: int) -> list[str]:
    """The training clients a fleet emulates: its generator's first draw (a fresh generator of
    the fleet's seed gives the same clients)."""
    return sorted(rng.choice(sorted(train), size=count, replace=False).tolist())


COUNTED = ("accepted", "duplicate")  # job results whose update the round aggregates

# observe(version, its weights, its downloaded folder, the clients whose updates it aggregated,
# each with the job it ran)
VersionObserver = Callable[[int, Weights, Path, dict[str, DeviceJob]], None]


def run_fleet(*, data: PreparedData, model_dir: Path | None, out: Path, config: FleetConfig,
              progress: bool | None = None, server: ServerAccess | None = None,
              observe: VersionObserver | None = None) -> list[RoundRecord]:
    """Run the simulation; return one record per round (round 0 = the initial model).

    Args:
        model_dir: the initial model, for the server this starts (unused with `server`).
        out: where the devices keep their homes and model stores (`out/device_cache`).
        server: a running server to use (default: start one with its state in `out/server`).
        observe: called with every version the fleet evaluates, the initial one included
            (the canary audit's hook).
    """
    config.validate(len(data.train))
    word_start = word_start_table(load_tokenizer(data.tokenizer_path))
    rng = np.random.default_rng(config.seed)
    client_ids = draw_clients(rng, data.train, config.clients)
    fleet_test = {c: data.test[c] for c in client_ids if len(data.test[c]) > 1}
    patterns = draw_fleet(config.clients, seed=config.seed, config=config.availability)
    clock = SimulatedClock(config.start_hour_utc * HOUR)
    cache = Path(out) / "device_cache"

    def evaluate(weights, version, clients, participation, seconds=0.0, traffic=None, round_=0, examples=0, steps=0):
        traffic = traffic or traffic_summary([])
        return RoundRecord(round=round_, model_version=version, clients=clients,
                           eval=evaluate_weights(weights, data.heldout, word_start, config.eval),
                           eval_participants=evaluate_weights(weights, fleet_test, word_start, config.eval)
                           if fleet_test else None,
                           participation=participation, bytes_uploaded=traffic["bytes_uploaded"]["total"],
                           bytes_downloaded=traffic["bytes_downloaded"]["total"], traffic=traffic,
                           seconds=round(seconds, 2), sim_time=clock.now, examples=examples, steps=steps)

    if server is None:
        server = ServerProcess(state=out / "server", init_model=model_dir, log_path=out / "server.log", config=config)
    executor = ProcessExecutor(config.workers) if config.workers > 1 else InlineExecutor()
    session = requests.Session()
    fleet_client = ServerClient(server.operator_url)
    phones: list[_Phone] = []
    records = []
    try:
        versions = _Versions(cache / "fleet", fleet_client)
        version = server.status()["model_version"]
        manifest = versions.manifest(version)
        if manifest.tokenizer_sha256 != sha256_file(data.tokenizer_path):
            raise FedkbError(f"the server's model version {version} was not exported with the data's tokenizer "
                             f"{data.tokenizer_path}: the prepared token streams would mean other words")
        phones = _enroll(server, client_ids, data, patterns, clock, config, cache / "homes", session)
        pool = cache / "shared_files"
        client_of = {str(p.home): p.client_id for p in phones}
        records.append(evaluate(versions.weights(version), version, 0, Participation()))
        if observe is not None:
            observe(version, versions.weights(version), versions.store.version_dir(version), {})
        bar = tqdm(total=config.rounds, desc="rounds", unit="round", disable=None if progress is None else not progress)
        for round_number in range(1, config.rounds + 1):
            started = time.monotonic()
            budget = (server.status().get("privacy") or {}).get("budget") or {}
            if budget.get("state") == "spent":  # the target epsilon lets no further round open
                log.warning("round %d: %s", round_number, budget["message"])
                break
            eligible = [p for p in phones if can_continue(p.device.state.current(), POLICY)]  # awake, charging, Wi-Fi
            before = {p.index: dataclasses.replace(p.device.client.traffic) for p in eligible}
            secagg = SecAggRound(server.end_round, lambda: _secagg_stage(server)) if config.secure_aggregation else None
            selected = _select(eligible, rng.permutation(len(eligible)), secagg)
            if secagg is not None:
                secagg.share()  # (b): in this process, a few ms per phone
            for p in eligible:
                share(p.device.models.root, pool)
            # Each selected phone runs its job under the edge runtime's scheduler on the simulated
            # clock: one whose night ends mid-job (unplugged, picked up, off Wi-Fi) drops out. With
            # secure aggregation the job is the phone's input step (train, encode, mask, upload).
            workers = selected if secagg is None else [(p, t) for p, t in selected
                                                       if p.index in {m.key for m in secagg.input_members()}]
            jobs = [DeviceJob(server.url, str(p.home), dataclasses.asdict(t), data.train[p.client_id],
                              str(pool), seed=config.seed * 100_003 + round_number * 1009 + p.index,
                              pattern=patterns[p.index], availability=config.availability, sim_start=clock.now,
                              job_seconds=config.job_minutes * 60, steps=job_steps(
                                  data.train[p.client_id], seq_len=manifest.seq_len, task=t), policy=POLICY,
                              secagg=secagg is not None)
                    for p, t in workers]
            done = list(executor.run(run_device_job, jobs))
            results: list[JobResult] = [result for _, result in done]
            counted = [r for r in results if r.status in COUNTED]
            failed = [r.status for r in results if r.status.startswith("failed")]
            if failed:
                log.warning("round %d: %d device jobs failed, first: %s", round_number, len(failed), failed[0])
            phone_of = {str(p.home): p.index for p in phones}
            if secagg is not None:
                for job, r in done:
                    secagg.record_input(phone_of[job.home], r)
                secagg.unmask()  # (d): the survivors' shares; the stage closes once all answered
            status = server.status()
            if status["model_version"] <= version and secagg is None:
                server.end_round()  # everyone who could has reported: close (or abandon) now
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                status = server.status()
                current = status.get("round") or {}
                if status["model_version"] > version or current.get("state") == "abandoned" or current.get("id", 0) > (
                        selected[0][1].round_id if selected else 0) or not selected:
                    break
                time.sleep(0.1)
            if secagg is not None:
                secagg.finish()  # (e): every phone learns done or dropped and forgets the round
            new_version = status["model_version"]
            participation = Participation(eligible=len(eligible), selected=len(selected), completed=len(counted),
                                          dropped=sum(r.status == "dropped" for r in results) + len(failed),
                                          late=sum(r.status == "late" for r in results),
                                          rejected=sum(r.status.startswith("rejected") for r in results))
            moved = {p.index: p.device.client.traffic.since(before[p.index]) for p in eligible}
            for job, r in done:
                if isinstance(r, JobResult):
                    moved[phone_of[job.home]] = _plus(moved.get(phone_of[job.home], Traffic()), r)
            traffic = traffic_summary([(t.requests, t.bytes_sent, t.bytes_received) for t in moved.values()])
            prune(pool)  # no job runs now
            seconds = time.monotonic() - started
            if new_version > version:
                version = new_version
                record = evaluate(versions.weights(version), version, len(counted), participation, seconds, traffic,
                                  round_number, sum(r.num_examples for r in counted), sum(r.steps for r in counted))
                if observe is not None:
                    observe(version, versions.weights(version), versions.store.version_dir(version),
                            {client_of[job.home]: job for job, r in done if r.status in COUNTED})
            else:  # abandoned: the model did not change
                record = dataclasses.replace(records[-1], round=round_number, clients=0, participation=participation,
                                             bytes_uploaded=traffic["bytes_uploaded"]["total"],
                                             bytes_downloaded=traffic["bytes_downloaded"]["total"], traffic=traffic,
                                             seconds=round(seconds, 2), sim_time=clock.now, examples=0, steps=0)
            records.append(dataclasses.replace(record, privacy=(status.get("privacy") or {}).get("spent"),
                                               secagg=None if secagg is None else {
                                                   **secagg.counts(), "grid": _grid_facts(status, selected)}))
            bar.update(1)
            bar.set_postfix(v=version, clients=len(counted), word_ppl=f"{record.eval.word_perplexity:.0f}",
                            top1=f"{record.eval.top1:.3f}")
            log.info("round %d: version %d, %d eligible, %d selected, %d accepted; held-out word perplexity %.1f",
                     round_number, version, len(eligible), len(selected), len(counted), record.eval.word_perplexity)
            clock.now += config.round_hours * HOUR
        bar.close()
    finally:
        for phone in phones:
            phone.device.close()
        fleet_client.close()
        executor.close()
        server.stop()
    return records


def _grid_facts(status: dict, selected) -> dict | None:
    """A SecAgg round's grid as the server recorded it (`/v1/admin/status`'s `last_round`): its bits
    per masked value, whether it calibrated on the fixed grid, and the blocks the tuned grid left
    out because their sum overflowed (all of them if the round was refused for it). None when the
    status holds no record of this round (no phone was selected)."""
    if not selected:
        return None
    rounds = [r for r in (status.get("round"), status.get("last_round")) if r and r.get("id") == selected[0][1].round_id]
    if not rounds:
        return None
    record = rounds[0]
    return {"modulus_bits": record.get("secagg_modulus_bits"), "calibration": record.get("secagg_steps") is None,
            "blocks_left_out": record.get("secagg_dropped_blocks") or []}
