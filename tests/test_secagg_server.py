"""Secure aggregation over HTTP, server side (docs/secure_aggregation.md, "Over HTTP (step 2)").

A real server (the app on loopback, or `fedkb serve` as a process for restarts and kill -9) runs
SecAgg rounds against devices emulated here: each is the edge runtime's real `SecAggParticipant`
(its own state folder) plus `integer_encoding.encode` of a small synthetic update, speaking the
HTTP API. Checked: a round publishes the plain float32 round's weights within the grid's rounding
bound and exactly the decoded sum of the survivors' vectors; dropouts at every stage still publish
that exact sum; too many abandon the round with the reason; kill -9 at every stage resumes it (or
abandons a round whose stage deadline passed while the server was down); two gunicorn processes
serve concurrent devices to the exact sum; no file or table of the server ever holds one device's
unmasked vector; hostile messages get the documented codes and change nothing; with DP (noise 0)
the release equals the plain DP round's.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from safetensors.numpy import load_file

from aggregator.rounds import RoundRecord, tuning_history
from aggregator.secagg_release import secagg_sensitivity
from edge_runtime.secagg_job import grid_tail
from edge_runtime.secagg_participant import SecAggParticipant
from fedkb.cli import build_parser
from fedkb.commands.serve import config_from_args
from fedkb_core import bitpack
from fedkb_core.clipping import clip_by_global_norm
from fedkb_core.errors import FedkbError
from fedkb_core.protocol import RoundTask, SecAggTask
from fedkb_core.secagg import key_agreement
from fedkb_core.secagg.integer_encoding import MASK_BITS, SecAggGrid, add_mod, decode_sum, encode, tuned_steps
from fedkb_core.secagg.masked_wire import encode_masked
from fedkb_core.secagg.messages import (KeyAdvertisement, SecAggStatus, ShareUpload, UnmaskResponse)
from tests.fixtures_aggregator import (ADMIN, TINY_SHAPES, Device, ServeProcess, make_server,  # noqa: F401
                                       random_deltas, status, wait_for, weights_model)

NAMES = sorted(TINY_SHAPES)
LENGTH = sum(int(np.prod(s)) for s in TINY_SHAPES.values())
# The weight has L = 65,535 = 771·85 levels, so with max_examples 85 every weight n·L/85 is an exact
# integer and the grid's weights equal the plain round's n/85 exactly: the rounding of the values is
# the only error.
MAX_EXAMPLES = 85
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(tensors[k], np.float64)) for k in NAMES])


def grid_of(task: RoundTask) -> SecAggGrid:
    return SecAggGrid.for_task(task, LENGTH)


class SecAggDevice(Device):
    """One phone as the test emulates it: the real participant and encoder, over HTTP."""

    def __init__(self, url: str, home: Path, deltas: dict, num_examples: int, seed: int):
        super().__init__(url)
        assert self.enroll().status_code == 201
        self.participant = SecAggParticipant(home / self.device_id, self.device_id)
        self.deltas = deltas
        self.clipped, self.norm = None, None
        self.num_examples, self.rng = num_examples, np.random.default_rng(seed)
        self.task_: RoundTask | None = None
        self.x = None  # the encoded, unmasked vector (what the server must never hold)

    def take_task(self) -> RoundTask:
        self.task_ = self.task()
        self.clipped, self.norm = clip_by_global_norm(self.deltas, self.task_.clip_norm)  # as edge_runtime does
        self.encoded()  # trained and encoded before the stages: the vector exists from the start
        return self.task_

    @property
    def round_id(self) -> int:
        return self.task_.round_id

    def _post(self, path: str, body: dict) -> requests.Response:
        return self.http.post(f"{self.url}/v1/rounds/{self.round_id}/secagg{path}", json=body, headers=self.headers)

    def status(self) -> SecAggStatus:
        r = self.http.get(f"{self.url}/v1/rounds/{self.round_id}/secagg", headers=self.headers)
        assert r.status_code == 200, r.text
        return SecAggStatus.from_json(r.json())

    def advertise(self) -> requests.Response:
        return self._post("/keys", self.participant.advertise(self.round_id).to_json())

    def share(self) -> requests.Response:
        st = self.status()
        assert st.action == "share", st
        return self._post("/shares", self.participant.share(st.neighbours).to_json())

    def encoded(self) -> np.ndarray:
        grid = grid_of(self.task_)
        vector = np.concatenate([np.ravel(self.clipped[k]) for k in NAMES]).astype(np.float32)
        self.x = encode(vector, self.num_examples, grid, self.rng, unclipped=self.norm <= self.task_.clip_norm)
        return self.x

    def masked_body(self) -> bytes:
        """The masked upload (the participant masks one input per round: the same bytes every time)."""
        y = self.participant.mask(self.x)
        return encode_masked(y, self.task_.secagg.modulus_bits, tail_length=grid_tail(self.task_),
                             round_id=self.round_id, device_id=self.device_id, model_version=self.task_.model_version)

    def upload_masked(self) -> requests.Response:
        st = self.status()
        assert st.action == "upload", st
        self.participant.receive(st.inbox)
        return self.upload(self.round_id, self.masked_body())

    def unmask(self) -> requests.Response:
        st = self.status()
        assert st.action == "unmask", st
        return self._post("/unmask", self.participant.unmask(st.unmask).to_json())


def ok(r: requests.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def end_stage(url: str) -> dict:
    return ok(requests.post(f"{url}/v1/admin/rounds/current/end", headers=ADMIN_HEADERS))


def fleet(url: str, home: Path, n: int, *, seed: int = 0, examples=None, scale: float = 0.05) -> list[SecAggDevice]:
    examples = examples or [MAX_EXAMPLES] * n
    return [SecAggDevice(url, home, random_deltas(TINY_SHAPES, seed + i, scale=scale), examples[i], seed + i)
            for i in range(n)]


def sum_of(devices, task: RoundTask) -> np.ndarray:
    """The survivors' vectors summed as the server sums them (modulo 2^32), unmasked."""
    total = np.zeros(grid_of(task).vector_length, np.uint32)
    for d in devices:
        add_mod(total, d.x, MASK_BITS)
    return total


def expected_mean(devices, task: RoundTask) -> np.ndarray:
    """What the survivors' vectors decode to: Σ w·Δ / Σ w (exactly what the server must publish)."""
    grid = grid_of(task)
    decoded = decode_sum(sum_of(devices, task), grid, count=len(devices))
    return decoded.deltas(LENGTH) / decoded.weight


def assert_within_rounding(secure: np.ndarray, plain: np.ndarray, grid: SecAggGrid, m: int, denominator: float):
    """The published weights of a SecAgg round and of the plain round on the same clipped updates
    differ by the grid's rounding only: Rᵀe/denominator cut to the n weights, e = Σ_i e_i the sum of
    the m devices' rounding errors in the rotated domain (the weights are exact here, and no honest
    coordinate reaches the clamp ±c: ‖Δ‖ ≤ C and the rotation spreads it).

    Each e_ij is independent, zero-mean and within (−step, step) (stochastic rounding). So
    (1) ‖Rᵀe‖ ≤ ‖e‖ ≤ m·√P·step always; and (2) a weight's error Σ_j r_kj·e_j (Σ_j r_kj² = 1) is a
    sum of m·P independent terms with ranges of squared sum 4·m·step², so by Hoeffding it exceeds
    t = step·√(2·m·ln(2n/10⁻⁹)) in absolute value with probability at most 10⁻⁹/n, and none of
    the n does with probability ≥ 1 − 10⁻⁹. 10⁻⁶ more covers float32 rounding of the weights.
    """
    gap = secure - plain
    l2 = m * math.sqrt(grid.padded) * grid.step / denominator + 1e-6
    per_weight = grid.step * math.sqrt(2 * m * math.log(2 * LENGTH / 1e-9)) / denominator + 1e-6
    assert np.linalg.norm(gap) <= l2, (np.linalg.norm(gap), l2)
    assert np.max(np.abs(gap)) <= per_weight, (np.max(np.abs(gap)), per_weight)


def published(state_dir: Path, version: int) -> np.ndarray:
    return flat(load_file(state_dir / "models" / str(version) / "weights.safetensors"))


def wait_version(url: str, version: int, timeout: float = 30.0) -> None:
    wait_for(lambda: status(url)["model_version"] == version, timeout=timeout, what=f"version {version}")


def wait_round(url: str, round_id: int) -> dict:
    def finished():
        last = status(url)["last_round"]
        return last if last is not None and last["id"] == round_id else None
    return wait_for(finished, what=f"round {round_id} to end")


def secagg_tables(state_dir: Path) -> dict:
    """Every row of the secagg tables (what a refused message must leave unchanged)."""
    conn = sqlite3.connect(state_dir / "fedkb.sqlite")
    try:
        return {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}")), key=repr)
                for t in ("secagg_cohorts", "secagg_devices", "secagg_boxes", "secagg_seen_keys", "updates")}
    finally:
        conn.close()


WINDOW = 32


def _windows(data: bytes, size: int = WINDOW, count: int = 17) -> list[bytes]:
    """`count` windows spread evenly over `data`: any stored copy of a 16th of it contains one."""
    if len(data) <= size:
        return [data]
    return [data[i: i + size] for i in np.linspace(0, len(data) - size, count).astype(int)]


def _informative(window: bytes, itemsize: int) -> bool:
    """Whether a window of a device's integers could only be that device's: at least a quarter of
    its values nonzero. A device with a small weight (5 examples of 85) has a body of mostly zeros
    on a tuned grid, and zeros are in every page of every file: such a window is no evidence."""
    values = np.frombuffer(window[: len(window) - len(window) % itemsize], np.uint8).reshape(-1, itemsize)
    return int(values.any(axis=1).sum()) * 4 >= len(values)


def assert_no_unmasked_update(state_dir: Path, devices) -> None:
    """No file of the state folder and no cell of any table holds a device's encoded vector x (as
    uint32, as int64, packed at r bits) or its update (the clipped Δ, or x decoded alone, as float32
    or float64): windows of each (`_windows`) are searched for in every byte the server keeps.

    A window spans 64 coordinates of the low-entropy forms (x's integers, and x·step rotated: on a
    tuned grid most of a small update's integers are in −2..2, so 8 of them could match anything
    by chance; windows of mostly zeros are skipped, `_informative`) and 32 bytes of the others
    (floats of the update, which never match by chance). The check's own test plants each form:
    `test_the_leak_check_finds_every_form_of_a_devices_vector_planted_in_the_state`."""
    needles = []
    for d in devices:
        if d.x is None:
            continue
        grid = grid_of(d.task_)
        alone = decode_sum(d.x, grid, count=1)
        who = getattr(d, "device_id", "an earlier device")
        integers = {"x as uint32": d.x, "x as int64": d.x.astype(np.int64),
                    "x·step as float32": alone.rotated.astype(np.float32), "x·step as float64": alone.rotated}
        for kind, data in integers.items():
            needles += [(who, kind, w) for w in _windows(data.tobytes(), size=64 * data.itemsize)
                        if _informative(w, data.itemsize)]
        needles += [(who, "x packed", w) for w in _windows(
            bitpack.pack(d.x[: grid.padded], grid.modulus_bits).tobytes(), size=8 * grid.modulus_bits)
            if _informative(w, 1)]
        for kind, data in {"Δ as float32": flat(d.clipped).astype(np.float32), "Δ as float64": flat(d.clipped),
                           "x decoded as float32": alone.deltas(LENGTH).astype(np.float32),
                           "x decoded as float64": alone.deltas(LENGTH)}.items():
            needles += [(who, kind, w) for w in _windows(data.tobytes())]
    assert needles
    haystacks = [p.read_bytes() for p in Path(state_dir).rglob("*") if p.is_file()]
    conn = sqlite3.connect(state_dir / "fedkb.sqlite")
    try:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in conn.execute(f"SELECT * FROM {table}"):
                haystacks += [v if isinstance(v, bytes) else v.encode() for v in row if isinstance(v, (bytes, str))]
    finally:
        conn.close()
    # Every window of every haystack, once (a window across the seam of two haystacks could only be
    # a false alarm): a set lookup of each needle's first 32 bytes instead of a byte search, which
    # zero-heavy needles and pages make slow; a longer needle is then searched for whole.
    everything = b"\x00<seam>\x00".join(haystacks)
    windows = {everything[i: i + WINDOW] for i in range(len(everything) - WINDOW + 1)}
    for device, kind, needle in needles:
        found = needle[:WINDOW] in windows and (len(needle) <= WINDOW or needle in everything)
        if found:
            where = [str(p.relative_to(state_dir)) for p in Path(state_dir).rglob("*")
                     if p.is_file() and needle in p.read_bytes()]
            raise AssertionError(f"the server holds a device's unmasked vector: {len(needle)} bytes of {device}'s "
                                 f"{kind} ({needle[:16].hex()}...) in {where or 'a database cell'}")


def test_the_leak_check_finds_every_form_of_a_devices_vector_planted_in_the_state(tmp_path):
    """`assert_no_unmasked_update` can fail: each form of a device's vector, written into a file of
    a state folder or a database cell, is found and named; the clean folder passes. One device has
    a weight of 5 of 85 (a body of mostly zeros on the tuned grid): its update is still found."""
    state = tmp_path / "state"
    (state / "models" / "1").mkdir(parents=True)
    with sqlite3.connect(state / "fedkb.sqlite") as conn:
        conn.execute("CREATE TABLE cells (v BLOB)")
    conn.close()
    task = RoundTask(round_id=1, model_version=1, learning_rate=1.0, epochs=1, batch_size=2,
                     max_examples=MAX_EXAMPLES, clip_norm=1.0, deadline=0.0, encoding="secagg", update_bits=8,
                     rotation_seed=5, secagg=SecAggTask(modulus_bits=8, steps=tuned_steps(8, 5, 1.0, 1)))
    devices = []
    for i, n in enumerate((MAX_EXAMPLES, 5)):
        clipped, _ = clip_by_global_norm(random_deltas(TINY_SHAPES, 40 + i, scale=0.05), 1.0)
        x = encode(flat(clipped).astype(np.float32), n, grid_of(task), np.random.default_rng(i))
        devices.append(SimpleNamespace(x=x, task_=task, clipped=clipped, device_id=f"dev-{i}"))
    assert_no_unmasked_update(state, devices)
    grid = grid_of(task)
    full, small = devices
    plants = {"x as uint32": full.x.tobytes(), "x packed": bitpack.pack(full.x[: grid.padded], 8).tobytes(),
              "Δ as float32": flat(small.clipped).astype(np.float32).tobytes()}
    for kind, data in plants.items():
        leak = state / "models" / "1" / "leak.bin"
        leak.write_bytes(b"header" + data + b"trailer")
        with pytest.raises(AssertionError, match=f"dev-.'s {kind} .* in \\['models/1/leak.bin'\\]"):
            assert_no_unmasked_update(state, devices)
        leak.unlink()
    with sqlite3.connect(state / "fedkb.sqlite") as conn:
        conn.execute("INSERT INTO cells VALUES (?)", (flat(small.clipped).tobytes(),))
    conn.close()
    with pytest.raises(AssertionError, match="dev-1's Δ as float64 .* in \\['fedkb.sqlite'\\]"):  # the cell's page
        assert_no_unmasked_update(state, devices)


# -- configuration ---------------------------------------------------------------------------------

def _serve(tmp_path, *argv):
    args = build_parser().parse_args(["serve", "--state", str(tmp_path / "state"), *argv])
    return config_from_args(args, environ={"FEDKB_ENROLLMENT_SECRET": "s", "FEDKB_ADMIN_TOKEN": "a"})


def test_settings_resolve_and_refuse_in_one_line(tmp_path, capsys):
    on = _serve(tmp_path, "--secure-aggregation")
    assert (on.update_encoding, on.update_bits, on.secagg_tolerated_dropout, on.secagg_degree) == (
        "secagg", 8, 0.2, None) and on.secagg_tuned
    private = _serve(tmp_path, "--secure-aggregation", "--dp-noise-multiplier", "1")
    assert private.update_bits == 12 and not private.secagg_tuned  # DP: the fixed grid
    assert on.secagg_stage_seconds == on.task_report_window
    assert _serve(tmp_path, "--secure-aggregation", "--secagg-stage-timeout", "7").secagg_stage_seconds == 7
    env = {"FEDKB_ENROLLMENT_SECRET": "s", "FEDKB_ADMIN_TOKEN": "a", "FEDKB_SECURE_AGGREGATION": "1",
           "FEDKB_UPDATE_BITS": "10"}
    args = build_parser().parse_args(["serve", "--state", str(tmp_path / "state")])
    assert config_from_args(args, environ=env).update_bits == 10
    refused = {
        ("--update-encoding", "hadamard"): "update_encoding 'hadamard' cannot be used with it",
        ("--update-bits", "25"): "2..24",
        ("--update-bits", "1"): "2..24",
        ("--update-bits", "24", "--goal-clients", "300", "--dp-noise-multiplier", "1"): "above 2^32",
        ("--min-clients", "1"): "min_clients >= 2",
        ("--secagg-tolerated-dropout", "0.5"): "[0, 0.5)",
        ("--goal-clients", "2", "--over-selection", "1.5"): "cannot run the over-selected cohort of 3",
        ("--dp-noise-multiplier", "1", "--dp-mechanism", "ftrl", "--server-optimizer", "sgd"): "not built",
        ("--secagg-stage-timeout", "0"): "secagg_stage_timeout must be a positive",
    }
    for argv, text in refused.items():
        with pytest.raises(FedkbError) as err:
            _serve(tmp_path, "--secure-aggregation", *argv)
        assert text in str(err.value) and "\n" not in str(err.value), (argv, str(err.value))
    with pytest.raises(FedkbError, match="chosen by secure_aggregation"):
        _serve(tmp_path, "--update-encoding", "secagg")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--secure-aggregation" in text and "(default: 0.2)" in text and "8 bits per masked value" in text
    assert "(default: the task report window)" in text


def test_the_tuning_history_starts_at_the_last_calibration_and_an_overflow_recalibrates():
    def record(i, state="closed", tuned=True, measured=True):
        return RoundRecord(id=i, model_version=i, state=state, opened_at=0.0, deadline=1.0, min_clients=2,
                           goal_clients=5, max_assigned=5, clip_norm=1.0, learning_rate=1.0, epochs=1, batch_size=2,
                           max_examples=8, encoding="secagg", update_bits=8 if tuned else 12,
                           secagg_steps="[0.1]" if tuned else None,
                           secagg_block_rms="[0.01]" if measured else None)
    ids = lambda records: [r.id for r in tuning_history(records)]  # noqa: E731
    assert ids([record(5), record(4), record(3)]) == [5, 4, 3]
    assert ids([record(5), record(4, tuned=False), record(3)]) == [5, 4]  # back to the calibration round
    assert ids([record(5, tuned=False)]) == [5]
    assert ids([record(5, state="abandoned"), record(4), record(3)]) == []  # an overflow: calibrate again
    assert ids([record(5), record(4, state="abandoned"), record(3)]) == [5]
    assert ids([]) == []


def test_the_sensitivity_covers_the_rounding_the_server_cannot_reclip():
    grid = SecAggGrid(bits=12, modulus_bits=17, clip_norm=2.0, length=LENGTH, rotation_seed=3, max_examples=9,
                      weighted=False)
    assert secagg_sensitivity(grid) == pytest.approx(2.0 + math.sqrt(16384) * grid.step)
    rng = np.random.default_rng(0)
    for _ in range(20):  # an honest vector's distance from its clipped update never exceeds it
        delta = rng.normal(size=LENGTH)
        delta *= 2.0 / np.linalg.norm(delta)
        x = encode(delta.astype(np.float32), 1, grid, rng)
        decoded = decode_sum(x, grid, count=1).deltas(LENGTH)
        assert np.linalg.norm(decoded) <= secagg_sensitivity(grid)


# -- rounds ------------------------------------------------------------------------------------------

SECAGG = dict(secure_aggregation=True, goal_clients=5, over_selection=1.0, min_clients=2,
              device_max_examples=MAX_EXAMPLES)


def run_stages(devices, *, leak_check=None) -> None:
    """Every device takes every stage (advertising, sharing, input and unmasking each complete on
    their own); `leak_check()` runs after each stage."""
    for stage in ("advertise", "share", "upload_masked", "unmask"):
        for d in devices:
            ok(getattr(d, stage)())
        if leak_check:
            leak_check()


def test_a_round_publishes_the_plain_rounds_weights_within_the_grids_rounding(make_server, weights_model, tmp_path):
    """Five devices, weights 85, 50, 10, 85, 23 examples of 85 (exact weights on the grid): the SecAgg
    round publishes exactly the decoded sum of their vectors, and the plain float32 round's weights
    within the rounding bound (`assert_within_rounding`): the decoded mean is (Σ w_i·Δ_i + Rᵀe)/Σ w,
    the plain round's Σ n_i·Δ_i / Σ n_i, the same first term since w_i = n_i/85 exactly. Without DP the
    grid is tuned, but the first round has nothing to tune from: it calibrates on the fixed grid
    (b = 12, r = 12 + ⌈log₂ 5⌉), and the next round's 8-bit steps follow what it measured.
    """
    examples = [85, 50, 10, 85, 23]
    secure = make_server(weights_model, **SECAGG)
    plain = make_server(weights_model, goal_clients=5, over_selection=1.0, device_max_examples=MAX_EXAMPLES)
    state = secure.state.config.state_dir
    devices = fleet(secure.url, tmp_path / "phones", 5, examples=examples)
    tasks = [d.take_task() for d in devices]
    task = tasks[0]
    assert (task.encoding, task.update_bits, task.secagg.modulus_bits) == ("secagg", 12, 15)
    assert task.secagg.steps is None  # calibration: the fixed grid
    assert not task.secagg.unit_weights and not task.secagg.count_unclipped and task.report_by == task.deadline
    assert len({t.rotation_seed for t in tasks}) == 1 and task.rotation_seed is not None
    assert requests.get(f"{secure.url}/v1/status").json()["secure_aggregation"] is True

    seen = []

    def check():
        assert_no_unmasked_update(state, devices)
        seen.append(status(secure.url)["round"])

    run_stages(devices, leak_check=check)
    # Per-stage counts in the operator's status as the stages went by.
    assert [r["secagg"]["stage"] for r in seen[:3]] == ["sharing", "input", "unmasking"]
    assert seen[2]["secagg"]["counts"] == {"advertised": 5, "shared": 5, "u2": 5, "uploaded": 5, "u3": 5,
                                           "unmasked": 0}
    wait_version(secure.url, 2)
    assert_no_unmasked_update(state, devices)
    new = published(state, 2)
    start = published(state, 1)
    assert np.allclose(new, start + expected_mean(devices, task), rtol=0, atol=1e-6)

    for d, n in zip(devices, examples):  # the plain round, on the same clipped deltas
        plain_device = Device(plain.url)
        plain_device.enroll()
        t = plain_device.task()
        ok(plain_device.upload(t.round_id, plain_device.body(t, d.clipped, num_examples=n, update_norm=d.norm)))
    wait_version(plain.url, 2)
    assert_within_rounding(new, published(plain.state.config.state_dir, 2), grid_of(task), 5, sum(examples) / 85)

    # The round's secrets are gone; its keys' hashes stay, and a reused key is refused next round.
    tables = secagg_tables(state)
    assert tables["secagg_devices"] == [] and tables["secagg_boxes"] == [] and len(tables["secagg_seen_keys"]) == 10
    last = status(secure.url)["last_round"]
    assert last["secagg"]["stage"] == "finished" and last["secagg"]["counts"]["unmasked"] == 5
    assert last["encoding"] == "secagg" and last["secagg_modulus_bits"] == 15 and last["total_examples"] == 0
    # The operator sees the spread the round measured, which the next round's steps follow.
    decoded = decode_sum(sum_of(devices, task), grid_of(task), count=5)
    assert last["secagg_steps"] is None and last["secagg_dropped_blocks"] == []
    assert last["secagg_block_rms"] == pytest.approx([x / 5 for x in decoded.block_rms])
    assert ok(devices[0].http.get(f"{secure.url}/v1/rounds/{task.round_id}/secagg", headers=devices[0].headers)) == {
        "round_id": task.round_id, "stage": "finished", "action": "done"}
    again = SecAggDevice(secure.url, tmp_path / "phones", random_deltas(TINY_SHAPES, 9), 5, 9)
    next_task = again.take_task()
    # The next round is tuned: 8 bits, steps from the spread this one measured (one record: the
    # steepest growth assumed).
    assert (next_task.update_bits, next_task.secagg.modulus_bits) == (8, 8)
    assert next_task.secagg.steps == pytest.approx(
        tuned_steps(8, 5, next_task.clip_norm, 1, [last["secagg_block_rms"]]))
    assert next_task.secagg.steps[0] < tuned_steps(8, 5, next_task.clip_norm, 1)[0]  # finer than the prior
    old = devices[0].participant.advertise(task.round_id)
    r = again._post("/keys", KeyAdvertisement(next_task.round_id, old.mask_key, old.share_key).to_json())
    assert (r.status_code, r.json()["error"]) == (400, "reused_key")



def test_a_tuned_round_publishes_its_decoded_sum_within_its_rounding(make_server, weights_model, tmp_path):
    """A calibration round, then a tuned round of five other devices at 8 bits per value: the tuned
    round publishes exactly the decoded sum of its vectors, and the exact example-weighted mean of
    the clipped deltas within the rounding bound of its steps (`assert_within_rounding`, with the
    largest block's step); its upload is one byte per value plus the tail and the header."""
    secure = make_server(weights_model, **SECAGG)
    state = secure.state.config.state_dir
    first = fleet(secure.url, tmp_path / "phones", 5, seed=300)
    for d in first:
        d.take_task()
    run_stages(first)
    wait_version(secure.url, 2)
    examples = [85, 17, 34, 85, 51]
    devices = fleet(secure.url, tmp_path / "phones", 5, seed=400, examples=examples)
    task = [d.take_task() for d in devices][0]
    assert task.secagg.steps is not None and task.secagg.modulus_bits == 8
    run_stages(devices, leak_check=lambda: assert_no_unmasked_update(state, devices))
    wait_version(secure.url, 3)
    start, new = published(state, 2), published(state, 3)
    assert np.allclose(new, start + expected_mean(devices, task), rtol=0, atol=1e-6)
    exact = sum(n * flat(d.clipped) for d, n in zip(devices, examples)) / sum(examples)
    assert_within_rounding(new, start + exact, grid_of(task), 5, sum(examples) / 85)
    body = devices[0].masked_body()
    assert len(body) - bitpack.packed_size(grid_of(task).padded, 8) - 4 < 500

def test_dropouts_at_every_stage_still_publish_the_survivors_exact_sum(make_server, weights_model, tmp_path):
    """Ten devices (k = 9, t = 5): one stops after advertising, one after sharing, one after fetching
    its inbox (never uploads), one after uploading (never answers the unmask request). The operator's
    `end` closes each stage the missing device holds open; the round publishes exactly the decoded
    sum of the seven vectors that arrived (the silent answerer's included), and each dropout is told
    why it is out."""
    server = make_server(weights_model, **{**SECAGG, "goal_clients": 10})
    devices = fleet(server.url, tmp_path / "phones", 10, seed=100, examples=[85, 10, 50, 85, 23, 85, 1, 85, 40, 60])
    task = [d.take_task() for d in devices][0]
    quiet_after_keys, quiet_after_shares, quiet_after_inbox, quiet_after_upload = devices[:4]
    for d in devices:
        ok(d.advertise())
    for d in devices[1:]:
        ok(d.share())
    assert end_stage(server.url)["secagg_closed"] == ["sharing"]
    assert quiet_after_keys.status().reason == "missed_sharing"
    assert quiet_after_shares.status().action == "upload"
    quiet_after_inbox.participant.receive(quiet_after_inbox.status().inbox)  # opened, then silent
    for d in devices[3:]:
        ok(d.upload_masked())
    assert end_stage(server.url)["secagg_closed"] == ["input"]
    assert quiet_after_shares.status().reason == "missed_input" and quiet_after_inbox.status().action == "dropped"
    for d in devices[4:]:
        ok(d.unmask())
    assert end_stage(server.url)["secagg_closed"] == ["unmasking"]
    wait_version(server.url, 2)
    survivors = devices[3:]  # the one that did not answer still uploaded: its input counts
    new, start = published(server.state.config.state_dir, 2), published(server.state.config.state_dir, 1)
    assert np.allclose(new, start + expected_mean(survivors, task), rtol=0, atol=1e-6)
    last = status(server.url)["last_round"]
    assert last["secagg"]["counts"] == {"advertised": 10, "shared": 9, "u2": 9, "uploaded": 7, "u3": 7, "unmasked": 6}
    assert quiet_after_upload.status().action == "done"


def test_too_many_dropouts_abandon_the_round_at_the_stage_timeout(make_server, weights_model, tmp_path):
    """Five devices (k = 4, t = 3), two of which never share: when sharing times out, every device
    that shared has only 2 neighbours that shared, below t, so pruning empties U2 and the round is
    abandoned (`secagg_too_few_shared`): nothing is published, the secrets are deleted, every device
    is told, and the next round opens."""
    server = make_server(weights_model, **SECAGG, secagg_stage_timeout=3.0)
    state = server.state.config.state_dir
    devices = fleet(server.url, tmp_path / "phones", 5, seed=200)
    task = [d.take_task() for d in devices][0]
    for d in devices:
        ok(d.advertise())
    for d in devices[2:]:
        ok(d.share())
    last = wait_round(server.url, task.round_id)
    assert last["state"] == "abandoned" and last["outcome"].startswith("secagg_too_few_shared: ")
    assert last["secagg"]["stage"] == "abandoned" and last["secagg"]["abandoned_reason"] == "secagg_too_few_shared"
    for d in devices:
        st = d.status()
        assert (st.stage, st.action, st.reason) == ("abandoned", "dropped", "secagg_too_few_shared")
    assert status(server.url)["model_version"] == 1
    tables = secagg_tables(state)
    assert tables["secagg_devices"] == [] and tables["secagg_boxes"] == []
    wait_for(lambda: status(server.url)["round"] and status(server.url)["round"]["id"] == task.round_id + 1,
             what="the next round")
    assert not (state / "sums" / f"{task.round_id}.safetensors").exists()


def test_hostile_messages_get_their_codes_and_change_nothing(make_server, weights_model, tmp_path):
    server = make_server(weights_model, **{**SECAGG, "goal_clients": 4})
    state = server.state.config.state_dir
    devices = fleet(server.url, tmp_path / "phones", 4, seed=300)
    outsider = SecAggDevice(server.url, tmp_path / "phones", random_deltas(TINY_SHAPES, 1), 5, 1)
    task = [d.take_task() for d in devices][0]
    a, b = devices[0], devices[1]
    rid = task.round_id

    def refused(response, status_code, code):
        before = secagg_tables(state)
        r = response() if callable(response) else response
        assert (r.status_code, r.json()["error"]) == (status_code, code), r.text
        assert secagg_tables(state) == before

    ok(a.advertise())
    ad = a.participant.advertise(rid)
    low_order = bytes(32)  # the all-zero point: X25519 gives the zero secret with it
    key = key_agreement.KeyPair.generate().public
    for body, status_code, code in (
            (KeyAdvertisement(rid, key, key_agreement.KeyPair.generate().public), 409, "secagg_conflict"),
            (KeyAdvertisement(rid + 1, ad.mask_key, ad.share_key), 400, "round_mismatch")):
        refused(lambda: a._post("/keys", body.to_json()), status_code, code)
    refused(lambda: b._post("/keys", KeyAdvertisement(rid, ad.mask_key, key).to_json()), 400, "duplicate_key")
    refused(lambda: b._post("/keys", KeyAdvertisement(rid, low_order, key).to_json()), 400, "bad_key")
    refused(lambda: b._post("/keys", {"round_id": rid, "mask_key": "not base64"}), 400, "bad_request")
    refused(lambda: b._post("/shares", ShareUpload(rid, {a.device_id: bytes(100)}).to_json()), 409,
            "secagg_wrong_stage")
    outsider.task_ = task
    refused(lambda: outsider.advertise(), 403, "no_task")
    refused(lambda: requests.post(f"{server.url}/v1/rounds/{rid}/secagg/keys", json=ad.to_json()), 401, "unauthorized")
    refused(lambda: a.http.get(f"{server.url}/v1/rounds/{rid + 7}/secagg", headers=a.headers), 404, "unknown_round")
    assert ok(a._post("/keys", ad.to_json()))["action"] == "wait"  # a retry: the same answer
    for d in devices[1:]:
        ok(d.advertise())
    assert a.status().action == "share"
    # Sharing: boxes for the wrong devices, of the wrong size; a conflicting retry.
    upload = a.participant.share(a.status().neighbours)
    wrong = dict(upload.boxes)
    wrong.pop(b.device_id)
    refused(lambda: a._post("/shares", ShareUpload(rid, wrong).to_json()), 400, "wrong_recipients")
    short = {k: v[:-1] for k, v in upload.boxes.items()}
    refused(lambda: a._post("/shares", ShareUpload(rid, short).to_json()), 400, "bad_box")
    refused(lambda: a.upload(rid, b"x" * 64), 400, "malformed_update")
    ok(a._post("/shares", upload.to_json()))
    ok(a._post("/shares", upload.to_json()))  # idempotent
    forged = {k: bytes(len(v)) for k, v in upload.boxes.items()}
    refused(lambda: a._post("/shares", ShareUpload(rid, forged).to_json()), 409, "secagg_conflict")
    x = a.x
    y = np.zeros_like(x)
    tail = grid_tail(task)
    early = encode_masked(y, task.secagg.modulus_bits, tail_length=tail, round_id=rid, device_id=a.device_id,
                          model_version=task.model_version)
    refused(lambda: a.upload(rid, early), 409, "secagg_wrong_stage")
    for d in devices[1:]:
        ok(d.share())
    # Input: another device's id in the body, a wrong modulus, a wrong length, not in U2.
    st = a.status()
    assert st.action == "upload"
    a.participant.receive(st.inbox)
    masked = a.participant.mask(a.x)
    r = task.secagg.modulus_bits
    refused(lambda: a.upload(rid, encode_masked(masked, r, tail_length=tail, round_id=rid, device_id=b.device_id,
                                                model_version=task.model_version)), 400, "device_mismatch")
    refused(lambda: a.upload(rid, encode_masked(masked, 31, tail_length=tail, round_id=rid, device_id=a.device_id,
                                                model_version=task.model_version)), 400, "bits_mismatch")
    refused(lambda: a.upload(rid, encode_masked(masked[:-1], r, tail_length=tail, round_id=rid, device_id=a.device_id,
                                                model_version=task.model_version)), 400, "length_mismatch")
    body = encode_masked(masked, r, tail_length=tail, round_id=rid, device_id=a.device_id,
                         model_version=task.model_version)
    refused(lambda: a.upload(rid, body[:-10]), 400, "malformed_update")  # tensor data cut short
    upload_answer = ok(a.upload(rid, body))
    assert "update_norm" not in upload_answer
    assert ok(a.upload(rid, body))["duplicate"] is True
    other = encode_masked(masked + np.uint32(1), r, tail_length=tail, round_id=rid, device_id=a.device_id,
                          model_version=task.model_version)
    refused(lambda: a.upload(rid, other), 409, "already_submitted")
    refused(lambda: a._post("/unmask", UnmaskResponse(rid, {}, {}).to_json()), 409, "secagg_wrong_stage")
    for d in devices[1:]:
        ok(d.upload_masked())
    # Unmasking: the wrong shares, then a conflicting second answer.
    request = a.status().unmask
    answer = a.participant.unmask(request)
    partial = UnmaskResponse(rid, dict(list(answer.self_seed_shares.items())[1:]), {})
    refused(lambda: a._post("/unmask", partial.to_json()), 400, "wrong_shares")
    too_big = UnmaskResponse(rid, {k: b"\xff" * 33 for k in answer.self_seed_shares}, {})
    refused(lambda: a._post("/unmask", too_big.to_json()), 400, "bad_share")
    ok(a._post("/unmask", answer.to_json()))
    changed = UnmaskResponse(rid, {k: bytes(33) for k in answer.self_seed_shares}, {})
    refused(lambda: a._post("/unmask", changed.to_json()), 409, "secagg_conflict")
    refused(lambda: b._post("/keys", b.participant.advertise(rid).to_json()), 409, "secagg_wrong_stage")
    rejected = status(server.url)["round"]["rejected"]
    assert rejected["secagg_conflict"] >= 3 and rejected["wrong_shares"] == 1
    for d in devices[1:]:
        ok(d.unmask())
    wait_version(server.url, 2)
    start, new = published(state, 1), published(state, 2)
    assert np.allclose(new, start + expected_mean(devices, task), rtol=0, atol=1e-6)


def test_a_private_round_equals_the_plain_private_round_before_noise(make_server, weights_model, tmp_path):
    """DP-FedAvg at noise multiplier 0 with adaptive clipping, five devices of which two clip: the
    SecAgg round (unit weights, the "not clipped" bit inside the vector) releases Σ Δ / goal within
    the grid's rounding of the plain DP round's (`assert_within_rounding` over the goal), and counts
    the same unclipped updates (the same b̃ and next clip norm, which the next round's tasks carry)."""
    dp = dict(dp_noise_multiplier=0.0, dp_adaptive_clipping=True, goal_clients=5, over_selection=1.0,
              device_max_examples=MAX_EXAMPLES)
    secure = make_server(weights_model, secure_aggregation=True, **dp)
    plain = make_server(weights_model, **dp)
    scales = [0.05, 0.2, 0.05, 0.3, 0.02]  # about 0.5, 2, 0.5, 3, 0.2: the second and fourth clip
    devices = [SecAggDevice(secure.url, tmp_path / "phones", random_deltas(TINY_SHAPES, 400 + i, scale=s),
                            7 * (i + 1), 400 + i) for i, s in enumerate(scales)]
    task = [d.take_task() for d in devices][0]
    assert task.secagg.unit_weights and task.secagg.count_unclipped
    assert [d.norm <= 1.0 for d in devices] == [True, False, True, False, True]
    run_stages(devices)
    wait_version(secure.url, 2)
    for d in devices:
        plain_device = Device(plain.url)
        plain_device.enroll()
        t = plain_device.task()
        ok(plain_device.upload(t.round_id, plain_device.body(t, d.clipped, num_examples=d.num_examples,
                                                             update_norm=d.norm)))
    wait_version(plain.url, 2)
    assert_within_rounding(published(secure.state.config.state_dir, 2), published(plain.state.config.state_dir, 2),
                           grid_of(task), 5, 5)  # unit weights over the goal
    secure_round, plain_round = status(secure.url)["last_round"], status(plain.url)["last_round"]
    assert secure_round["dp_unclipped_fraction"] == plain_round["dp_unclipped_fraction"] == pytest.approx(
        (3 - 5 / 2) / 5 + 0.5)
    assert secure_round["dp_next_clip_norm"] == plain_round["dp_next_clip_norm"]
    follower = SecAggDevice(secure.url, tmp_path / "phones", random_deltas(TINY_SHAPES, 1), 5, 1)
    assert follower.take_task().clip_norm == pytest.approx(secure_round["dp_next_clip_norm"])


def test_a_server_killed_at_every_stage_resumes_it_and_publishes_the_right_sum_or_abandons(weights_model, tmp_path):
    """`fedkb serve` (gunicorn) on one state folder, SIGKILLed (its whole process group) at every
    stage of a round of five devices (k = 4, t = 3), and restarted each time: while advertising (3 of
    5 keys in), while sharing (2 boxes of 5 in), during input with the first masked input folded and
    checkpointed and two more accepted but not checkpointed (`--checkpoint-interval 60` for that
    process: its first fold checkpoints, the next ones wait), while unmasking (2 of 4 answers in),
    and between the last answer and the publication (the test holds the folder lock, so no worker of
    that process can start the release: the round is `closing` when it dies). The fifth device never
    uploads, so its neighbours are asked for its mask key's shares. After each restart the phones
    restart too (new participants over their state folders), the stage resumes with the same sets, a
    device asked again gets the same question (keys, neighbour list, inbox, unmask request) and gives
    the same answer, no device is ever asked for both kinds of share of one peer, and no file or
    table of the server holds one device's vector. The round publishes exactly the decoded sum of the
    four inputs, each counted once. A second round, killed while sharing with 2 of 5 boxes in, is
    restarted after its stage deadline passed (the test moves the stage's start an hour back while
    the server is down, as an hour of downtime would): the restarted server abandons it
    (`secagg_too_few_shared`), publishes nothing and deletes its keys and boxes."""
    from aggregator.folding import FolderLock
    from tests.fixtures_aggregator import SECRET

    state, home = tmp_path / "state", tmp_path / "phones"
    flags = ("--secure-aggregation", "--goal-clients", "5", "--over-selection", "1.0", "--min-clients", "2",
             "--server-optimizer", "sgd", "--device-max-examples", str(MAX_EXAMPLES), "--round-timeout", "600")
    env = {"FEDKB_ENROLLMENT_SECRET": SECRET, "FEDKB_ADMIN_TOKEN": ADMIN, "FEDKB_WORKER_INTERVAL": "0.05"}
    processes, lock = [], FolderLock(state)
    devices, earlier = [], []  # earlier: round 1's vectors, still searched for after round 2 began

    def serve(port=None, *, checkpoint="0") -> ServeProcess:
        proc = ServeProcess(state, weights_model, *flags, "--checkpoint-interval", checkpoint,
                            log=tmp_path / "serve.log", port=port, env=env)
        processes.append(proc)
        return proc

    def restart(proc: ServeProcess, *, hold_folder=False, downtime: float = 0.0, **kwargs) -> ServeProcess:
        proc.kill9()
        assert_no_unmasked_update(state, devices + earlier)
        if hold_folder:
            assert lock.try_acquire()
        else:
            lock.release()
        if downtime:  # the clock moves on while the server is down
            with sqlite3.connect(state / "fedkb.sqlite") as conn:
                conn.execute("UPDATE secagg_cohorts SET stage_started_at = stage_started_at - ?", (downtime,))
            conn.close()
        proc = serve(proc.port, **kwargs)
        assert_no_unmasked_update(state, devices + earlier)  # and once the new process began its work
        for d in devices:  # the phones restart too: a new session and participant over the same folders
            d.http = requests.Session()
            d.participant = SecAggParticipant(home / d.device_id, d.device_id)
        return proc

    def secagg_now(proc) -> dict:
        return status(proc.url)["round"]["secagg"]

    asked, answers = {}, {}  # every UnmaskRequest each device was sent; its first answer

    def unmask_request(d) -> object:
        st = d.status()
        assert st.action == "unmask", st
        asked.setdefault(d.device_id, []).append(st.unmask)
        return st.unmask

    proc = serve()
    try:
        devices += fleet(proc.url, home, 5, seed=500, examples=[85, 30, 60, 5, 40])
        task = [d.take_task() for d in devices][0]
        rid = task.round_id
        ids = [d.device_id for d in devices]

        # Advertising: three of five keys committed.
        for d in devices[:3]:
            ok(d.advertise())
        adverts = {d.device_id: d.participant.advertise(rid) for d in devices[:3]}
        assert secagg_now(proc)["stage"] == "advertising"
        proc = restart(proc)
        assert secagg_now(proc)["counts"]["advertised"] == 3
        for d in devices[:3]:  # asked again: the same keys, accepted again
            assert d.participant.advertise(rid) == adverts[d.device_id]
            assert ok(d.advertise())["action"] == "wait"
        for d in devices[3:]:
            ok(d.advertise())

        # Sharing: two of five devices' boxes committed.
        lists = {d.device_id: d.status().neighbours for d in devices}
        uploads = {d.device_id: d.participant.share(lists[d.device_id]) for d in devices[:2]}
        for d in devices[:2]:
            ok(d._post("/shares", uploads[d.device_id].to_json()))
        assert secagg_now(proc)["stage"] == "sharing"
        proc = restart(proc, checkpoint="60")
        assert secagg_now(proc)["counts"]["shared"] == 2
        for d in devices[:2]:
            assert d.status().action == "wait"
            assert d.participant.share(lists[d.device_id]) == uploads[d.device_id]
            assert ok(d._post("/shares", uploads[d.device_id].to_json()))["action"] == "wait"
        for d in devices[2:]:
            assert d.status().neighbours == lists[d.device_id]
            ok(d.share())

        # Input: the first masked input folded and checkpointed, two more accepted but not checkpointed.
        inboxes = {d.device_id: d.status().inbox for d in devices}
        ok(devices[0].upload_masked())
        wait_for(lambda: status(proc.url)["round"]["folded"] == 1, what="the first input folded and checkpointed")
        for d in devices[1:3]:
            ok(d.upload_masked())
        inbox = state / "inbox" / str(rid)
        assert status(proc.url)["round"]["folded"] == 1  # the checkpoint still holds one input only
        assert all(list(inbox.glob(f"{d.device_id}-*")) for d in devices[1:3])  # two blobs not checkpointed
        proc = restart(proc)
        assert [d.status().action for d in devices[:3]] == ["wait"] * 3
        for d in devices[3:]:
            assert d.status().inbox == inboxes[d.device_id]
        assert ok(devices[1].upload(rid, devices[1].masked_body()))["duplicate"] is True  # a retry: the same bytes
        ok(devices[3].upload_masked())  # the fifth never uploads
        assert end_stage(proc.url)["secagg_closed"] == ["input"]
        wait_for(lambda: status(proc.url)["round"]["folded"] == 4, what="four inputs folded, each once")
        assert devices[4].status().reason == "missed_input"

        # Unmasking: two of four answers committed.
        for d in devices[:4]:
            unmask_request(d)
        for d in devices[:2]:
            answers[d.device_id] = d.participant.unmask(asked[d.device_id][0])
            ok(d._post("/unmask", answers[d.device_id].to_json()))
        assert secagg_now(proc)["stage"] == "unmasking"
        proc = restart(proc, hold_folder=True)  # no worker of the next process can start the release
        assert secagg_now(proc)["counts"]["unmasked"] == 2
        for d in devices[:2]:
            assert d.status().action == "wait"
            assert d.participant.unmask(asked[d.device_id][0]) == answers[d.device_id]
            assert ok(d._post("/unmask", answers[d.device_id].to_json()))["action"] == "wait"
        for d in devices[2:4]:
            assert unmask_request(d) == asked[d.device_id][0]
            ok(d._post("/unmask", d.participant.unmask(asked[d.device_id][-1]).to_json()))
        now = status(proc.url)
        assert (now["round"]["state"], now["model_version"], now["worker"]["holds_lock"]) == ("closing", 1, False)
        assert now["round"]["secagg"]["stage"] == "finished"

        # Between the last answer and the publication: the round is closing, the release not begun.
        proc = restart(proc)
        wait_version(proc.url, 2)
        start, new = published(state, 1), published(state, 2)
        assert np.allclose(new, start + expected_mean(devices[:4], task), rtol=0, atol=1e-6)
        last = status(proc.url)["last_round"]
        assert last["id"] == rid and last["folded"] == 4 and last["secagg"]["counts"] == {
            "advertised": 5, "shared": 5, "u2": 5, "uploaded": 4, "u3": 4, "unmasked": 4}
        # Every device was asked one question, whatever the restarts (the last two before and after one).
        assert [len(asked[d]) for d in ids[:4]] == [1, 1, 2, 2]
        assert all(r == asked[d][0] for d in ids[:4] for r in asked[d])
        kinds = {}  # peer -> the kinds of its shares anyone was asked for: one only
        for d in ids[:4]:
            request = asked[d][0]
            assert set(request.survivors) == set(ids[:4]) and set(request.dropped) == {ids[4]}
            for peer in set(request.survivors) - {d}:
                kinds.setdefault(peer, set()).add("b")
            for peer in request.dropped:
                kinds.setdefault(peer, set()).add("s")
        assert all(len(k) == 1 for k in kinds.values()) and kinds[ids[4]] == {"s"}

        # Round 2: killed while sharing; its deadline passes while the server is down.
        earlier += [SimpleNamespace(x=d.x, task_=d.task_, clipped=d.clipped) for d in devices]
        assert_no_unmasked_update(state, earlier)
        assert [d.take_task().round_id for d in devices] == [rid + 1] * 5
        for d in devices:
            ok(d.advertise())
        for d in devices[:2]:
            ok(d.share())
        info = secagg_now(proc)
        assert info["stage"] == "sharing" and info["counts"]["shared"] == 2
        proc = restart(proc, downtime=3600.0)
        last = wait_round(proc.url, rid + 1)
        assert last["state"] == "abandoned" and last["outcome"].startswith("secagg_too_few_shared: ")
        for d in devices:
            st = d.status()
            assert (st.stage, st.action, st.reason) == ("abandoned", "dropped", "secagg_too_few_shared")
        assert status(proc.url)["model_version"] == 2 and not (state / "models" / "3").exists()
        tables = secagg_tables(state)
        assert tables["secagg_devices"] == [] and tables["secagg_boxes"] == []
        assert_no_unmasked_update(state, devices + earlier)
    finally:
        lock.release()
        for p in processes:
            p.stop()


def test_two_gunicorn_workers_run_a_round_of_concurrent_devices_to_the_exact_sum(weights_model, tmp_path):
    """`fedkb serve --workers 2`: six devices run every stage at once from their own threads, each
    request on a new connection (so it lands on either process: both answer `/v1/admin/status`, one
    holding the folder lock), polling for their next action. Stages close under SQLite's write lock
    in whichever process took the last message, so none closes twice and no message is lost: the
    counts are 6 at every stage, nothing was rejected, every device is told `done`, and the round
    publishes exactly the decoded sum of the six vectors."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from tests.fixtures_aggregator import SECRET

    env = {"FEDKB_ENROLLMENT_SECRET": SECRET, "FEDKB_ADMIN_TOKEN": ADMIN, "FEDKB_WORKER_INTERVAL": "0.05"}
    state = tmp_path / "state"
    proc = ServeProcess(state, weights_model, "--workers", "2", "--threads", "4", "--secure-aggregation",
                        "--goal-clients", "6", "--over-selection", "1.0", "--min-clients", "2", "--server-optimizer",
                        "sgd", "--device-max-examples", str(MAX_EXAMPLES), "--checkpoint-interval", "0",
                        "--round-timeout", "600", log=tmp_path / "serve.log", env=env)
    try:
        devices = fleet(proc.url, tmp_path / "phones", 6, seed=700, examples=[85, 30, 60, 5, 40, 85])
        for d in devices:
            d.http.headers["Connection"] = "close"  # a new connection per request: any process may answer
        start = Barrier(len(devices))

        def run(d: SecAggDevice) -> list[str]:
            start.wait()
            d.take_task()
            ok(d.advertise())
            actions = []
            while True:
                st = wait_for(lambda: (s := d.status()).action != "wait" and s, timeout=30, interval=0.02,
                              what=f"{d.device_id}'s next action")
                actions.append(st.action)
                if st.action == "share":
                    ok(d._post("/shares", d.participant.share(st.neighbours).to_json()))
                elif st.action == "upload":
                    d.participant.receive(st.inbox)
                    ok(d.upload(d.round_id, d.masked_body()))
                elif st.action == "unmask":
                    ok(d._post("/unmask", d.participant.unmask(st.unmask).to_json()))
                else:
                    return actions

        with ThreadPoolExecutor(len(devices)) as pool:
            done = list(pool.map(run, devices))
        assert done == [["share", "upload", "unmask", "done"]] * len(devices)
        wait_version(proc.url, 2)
        task = devices[0].task_
        assert np.allclose(published(state, 2), published(state, 1) + expected_mean(devices, task), rtol=0, atol=1e-6)
        last = status(proc.url)["last_round"]
        assert last["id"] == task.round_id and last["folded"] == 6 and last["rejected"] == {}
        stages = ("advertised", "shared", "u2", "uploaded", "u3", "unmasked")
        assert last["secagg"]["counts"] == dict.fromkeys(stages, 6)
        holders = set()
        wait_for(lambda: holders.add(status(proc.url)["worker"]["holds_lock"]) or len(holders) == 2,
                 what="both processes answering")
    finally:
        proc.stop()


def test_a_masked_input_damaged_on_disk_counts_as_not_uploaded_while_input_is_open(make_server, weights_model,
                                                                                    tmp_path):
    """The worker, driven by hand, finds one accepted masked blob damaged before it folds it: it is
    quarantined and, input being open, its device counts as not having uploaded; the device is told
    to upload again, its identical body is accepted, and the round publishes the exact sum."""
    server = make_server(weights_model, **SECAGG, background_worker=False)
    worker, state = server.state.worker, server.state.config.state_dir
    worker.run_once()  # opens the round
    devices = fleet(server.url, tmp_path / "phones", 5, seed=600)
    task = [d.take_task() for d in devices][0]
    for stage in ("advertise", "share"):
        for d in devices:
            ok(getattr(d, stage)())
    for d in devices[:4]:
        ok(d.upload_masked())
    blob = next((state / "inbox" / str(task.round_id)).glob(f"{devices[0].device_id}-*"))
    blob.write_bytes(blob.read_bytes()[:-10])
    worker.run_once()
    assert list((state / "quarantine" / str(task.round_id)).iterdir())
    assert devices[0].status().action == "upload"
    assert status(server.url)["round"]["secagg"]["counts"]["uploaded"] == 3
    for d in (devices[0], devices[4]):  # the first again, with the same masked vector; the last for the first time
        ok(d.upload_masked())
    for d in devices:
        ok(d.unmask())
    wait_for(lambda: worker.run_once() or status(server.url)["model_version"] == 2, what="version 2")
    assert np.allclose(published(state, 2), published(state, 1) + expected_mean(devices, task), rtol=0, atol=1e-6)
