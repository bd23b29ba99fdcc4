"""Secure aggregation's costs: bytes and CPU per device per round, server CPU and memory, and how
often a round survives dropout. The protocol runs in-process (the real participants over real
state folders, the real cohort), at the default model's size.

Three tables:

1. **Bytes per device per round** for cohorts n = 26 (the default goal 20 × 1.3 over-selection),
   100 and 1,000, at the default degree k (`graph.default_degree(n, 0.2)`) and b = 12 bits
   (r = b + ⌈log₂ n⌉): every message a device sends and receives (JSON as the HTTP API carries
   it, the masked upload as its safetensors body), against a plain float32 update, a plain
   `hadamard` 8-bit update, and the same r-bit integers uploaded without any protocol (the
   protocol's own overhead). Message sizes depend on k, not on n: they are built from real keys,
   real boxes and real shares for k neighbours.
2. **CPU per device** as k grows (4 … 84 neighbours, the real vector of 1,163,265 values at
   r = 17): advertising (two X25519 key pairs), sharing (k key agreements, Shamir, k AES-GCM
   boxes), receiving (k boxes opened), masking (k + 1 ChaCha20 expansions of the vector) and
   unmasking; as ratios to one float32 server fold measured in the same run (the floor of any
   per-update server work), with milliseconds beside them.
3. **Server per round** for a cohort of 26 (complete graph, the default) and of 60 at k = 20,
   with 0 % and 20 % of the cohort dropping before upload: folding every masked upload, then
   `result()` (Shamir reconstruction, the masks regenerated and removed), its time and the peak
   memory it allocates (tracemalloc) against the size of one vector.
4. **Round success rate vs dropout**: rounds of 60 devices (short vectors: success depends on the
   graph and the thresholds, not on the vector) where each device independently drops before its
   masked upload with probability p; the share of rounds that still publish, at a sparse k = 20
   (where the union bound `n·P(Binomial(k, 1 − p) ≤ k/2)` predicts failures from p ≈ 0.2) and at
   the default degree (complete at this size: a round fails only when half the cohort is gone).

Usage:
    nice python bench/bench_secagg.py                 # a few minutes on 2 cores
    nice python bench/bench_secagg.py --quick         # fewer points, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from aggregator.secagg_cohort import CohortAbandoned, SecAggCohort  # noqa: E402
from edge_runtime.secagg_participant import SecAggParticipant  # noqa: E402
from fedkb_core import bitpack, hadamard  # noqa: E402
from fedkb_core.secagg import graph, shamir, share_box  # noqa: E402
from fedkb_core.secagg.integer_encoding import MASK_BITS  # noqa: E402
from fedkb_core.secagg.key_agreement import KeyPair  # noqa: E402
from fedkb_core.secagg.masked_wire import encode_masked  # noqa: E402
from fedkb_core.secagg.messages import (KeyAdvertisement, NeighbourEntry, NeighbourList, ShareInbox,  # noqa: E402
                                        ShareUpload, UnmaskRequest, UnmaskResponse)

PARAMETERS = 1_162_144  # the default export
VECTOR = hadamard.padded_length(PARAMETERS) + 1  # rotated blocks + the weight coordinate
BITS = 12  # the fixed grid's default b (with DP): r = b + ⌈log₂ n⌉
TUNED_BITS = 8  # the tuned grid's default r (without DP): bits per masked value
FLOAT32_BYTES = 4_649_320  # a float32 update of the default model, as bench_compression measured it
HADAMARD8_BYTES = 1_163_956
ROUND = 9


def _json_bytes(message) -> int:
    return len(json.dumps(message.to_json(), separators=(",", ":")).encode())


def _device_id(i: int) -> str:
    return f"device-{i:05d}-{'x' * 22}"  # 36 characters, like the server's ids


def message_bytes(n: int, k: int) -> dict:
    """The size of every message one device sends and receives with k neighbours (real keys,
    boxes and shares; sizes do not depend on the values)."""
    me = _device_id(0)
    others = [_device_id(i) for i in range(1, k + 1)]
    entries = tuple(NeighbourEntry(device_id=d, index=i + 2, mask_key=KeyPair.generate().public,
                                   share_key=KeyPair.generate().public) for i, d in enumerate(others))
    t = k // 2 + 1
    r = BITS + math.ceil(math.log2(n))  # the fixed grid's
    key = bytes(32)
    share = shamir.split(bytes(32), 1, [1])[1]

    def box(sender, recipient):
        return share_box.seal(key, share_box.pack_shares(sender, recipient, ROUND, share, share), round_id=ROUND,
                              sender=sender, recipient=recipient)

    masked = {bits: len(encode_masked(np.zeros(VECTOR, np.uint32), bits, tail_length=1, round_id=ROUND, device_id=me,
                                      model_version=1)) for bits in (TUNED_BITS, r)}
    sizes = {
        "keys (up)": _json_bytes(KeyAdvertisement(ROUND, KeyPair.generate().public, KeyPair.generate().public)),
        "neighbour list (down)": _json_bytes(NeighbourList(ROUND, 1, n, k, t, 32, entries)),
        "share boxes (up)": _json_bytes(ShareUpload(ROUND, {d: box(me, d) for d in others})),
        "inbox (down)": _json_bytes(ShareInbox(ROUND, {d: box(d, me) for d in others})),
        "unmask request (down)": _json_bytes(UnmaskRequest(ROUND, tuple([me] + others), ())),
        "unmask answer (up)": _json_bytes(UnmaskResponse(ROUND, {d: share for d in others}, {})),
    }
    # The task's steps (the tuned grid: one float per block, in the check-in answer's JSON).
    steps = len(json.dumps(list(np.full(hadamard.num_blocks(PARAMETERS), 1.2345678901234567e-05).tolist())))
    return {"n": n, "k": k, "t": t, "r": r, "sizes": sizes, "masked": masked, "steps_bytes": steps,
            "plain_bits": {bits: bitpack.packed_size(VECTOR - 1, bits) + 4 for bits in (TUNED_BITS, r)}}


def print_bytes(rows: list[dict]) -> None:
    print(f"\n1. Bytes per device per round (JSON bodies as sent; masked upload as its safetensors body; the tuned "
          f"grid at r = {TUNED_BITS} without DP, the fixed grid at b = {BITS}, r = b + ceil(log2 n) with DP)")
    names = list(rows[0]["sizes"])
    print("| message | " + " | ".join(f"n = {r['n']:,}, k = {r['k']}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r['sizes'][name]:,}" for r in rows) + " |")
    print("| the task's tuned steps (down, in the check-in answer) | "
          + " | ".join(f"{r['steps_bytes']:,}" for r in rows) + " |")
    for grid in ("tuned", "fixed"):
        bits = [TUNED_BITS if grid == "tuned" else r["r"] for r in rows]
        masked = [r["masked"][b] for r, b in zip(rows, bits)]
        totals = [sum(r["sizes"].values()) + m + (r["steps_bytes"] if grid == "tuned" else 0)
                  for r, m in zip(rows, masked)]
        print(f"| masked upload (up), {grid} grid | " + " | ".join(
            f"{m:,} (r = {b})" for m, b in zip(masked, bits)) + " |")
        print(f"| **all, up + down, {grid} grid** | " + " | ".join(f"**{t:,}**" for t in totals) + " |")
        print(f"| {grid}: vs float32 update (4,649,320) | " + " | ".join(f"{t / FLOAT32_BYTES:.3f}" for t in totals) + " |")
        print(f"| {grid}: vs hadamard 8-bit update (1,163,956) | "
              + " | ".join(f"**{t / HADAMARD8_BYTES:.3f}**" for t in totals) + " |")
        print(f"| {grid}: protocol overhead (all but the masked vector's payload) | " + " | ".join(
            f"{(t - r['plain_bits'][b]) / r['plain_bits'][b]:.2%}" for t, r, b in zip(totals, rows, bits)) + " |")


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def float32_fold_seconds(repeats: int) -> float:
    acc = np.zeros(PARAMETERS, np.float64)
    update = np.random.default_rng(0).normal(size=PARAMETERS).astype(np.float32)
    return _median(lambda: acc.__iadd__(update), repeats)


class InProcessRound:
    """n participants (each over its own state folder) and a cohort, stage by stage."""

    def __init__(self, root: Path, n: int, *, length: int, bits: int, degree: int | None, min_survivors: int = 2,
                 tolerated_dropout: float = 0.2, round_id: int = ROUND):
        self.ids = [_device_id(i) for i in range(n)]
        self.round_id = round_id
        self.devices = {d: SecAggParticipant(root / d, d) for d in self.ids}
        self.cohort = SecAggCohort(round_id, vector_length=length, modulus_bits=bits, min_survivors=min_survivors,
                                   tolerated_dropout=tolerated_dropout, degree=degree)
        self.length, self.bits = length, bits

    def advertise(self):
        for d in self.ids:
            self.cohort.advertise(d, self.devices[d].advertise(self.round_id))
        self.lists = self.cohort.close_advertising(os.urandom(32))

    def share(self):
        for d, lst in self.lists.items():
            self.cohort.receive_shares(d, self.devices[d].share(lst))
        self.inboxes = self.cohort.close_sharing()

    def receive(self):
        for d, inbox in self.inboxes.items():
            self.devices[d].receive(inbox)


def device_cpu(root: Path, degrees, repeats: int) -> list[dict]:
    """One device's CPU per stage with k neighbours (a cohort of k + 1, complete graph)."""
    bits = MASK_BITS  # masks and sums are modulo 2^32 whatever the grid (the body travels at r bits)
    rows = []
    x = np.random.default_rng(1).integers(0, 1 << TUNED_BITS, VECTOR, dtype=np.uint32)
    for k in degrees:
        timings = {"advertise": [], "share": [], "receive": [], "mask": [], "unmask": []}
        for rep in range(repeats):
            folder = root / f"k{k}-{rep}"
            r = InProcessRound(folder, k + 1, length=VECTOR, bits=bits, degree=k, tolerated_dropout=0.0,
                               round_id=ROUND + rep)
            me = r.ids[0]
            for d in r.ids:
                start = time.perf_counter()
                ad = r.devices[d].advertise(r.round_id)
                if d == me:
                    timings["advertise"].append(time.perf_counter() - start)
                r.cohort.advertise(d, ad)
            r.lists = r.cohort.close_advertising(os.urandom(32))
            for d, lst in r.lists.items():
                start = time.perf_counter()
                upload = r.devices[d].share(lst)
                if d == me:
                    timings["share"].append(time.perf_counter() - start)
                r.cohort.receive_shares(d, upload)
            r.inboxes = r.cohort.close_sharing()
            start = time.perf_counter()
            r.devices[me].receive(r.inboxes[me])
            timings["receive"].append(time.perf_counter() - start)
            start = time.perf_counter()
            r.devices[me].mask(x)
            timings["mask"].append(time.perf_counter() - start)
            others = [e.device_id for e in r.lists[me].neighbours]
            request = UnmaskRequest(r.round_id, tuple([me] + others), ())
            start = time.perf_counter()
            r.devices[me].unmask(request)
            timings["unmask"].append(time.perf_counter() - start)
            shutil.rmtree(folder)
        rows.append({"k": k, **{stage: statistics.median(v) for stage, v in timings.items()}})
    return rows


def print_device_cpu(rows: list[dict], fold: float) -> None:
    print(f"\n2. CPU per device per round vs its k neighbours (vector of {VECTOR:,} values, masked modulo 2^32; "
          f"ratio to one float32 server fold = {fold * 1e3:.2f} ms, measured in this run; medians)")
    stages = ["advertise", "share", "receive", "mask", "unmask"]
    print("| k | " + " | ".join(stages) + " | all |")
    print("|---|" + "---|" * (len(stages) + 1))
    for row in rows:
        total = sum(row[s] for s in stages)
        cells = [f"{row[s] * 1e3:.1f} ms ({row[s] / fold:.1f}×)" for s in stages]
        print(f"| {row['k']} | " + " | ".join(cells) + f" | {total * 1e3:.0f} ms ({total / fold:.0f}×) |")


def server_round(root: Path, n: int, degree: int | None, dropout: float, rng: np.random.Generator) -> dict:
    r = InProcessRound(root, n, length=VECTOR, bits=MASK_BITS, degree=degree, tolerated_dropout=0.2)
    r.advertise()
    r.share()
    r.receive()
    gone = set(rng.choice(r.ids, size=int(round(dropout * n)), replace=False).tolist())
    fold = 0.0
    x = rng.integers(0, 1 << TUNED_BITS, VECTOR, dtype=np.uint32)
    for d in r.inboxes:
        if d in gone:
            continue
        y = r.devices[d].mask(x)
        start = time.perf_counter()
        r.cohort.fold(d, y)
        fold += time.perf_counter() - start
    requests = r.cohort.close_input()
    for d, request in requests.items():
        r.cohort.receive_unmask(d, r.devices[d].unmask(request))
    tracemalloc.start()
    start = time.perf_counter()
    r.cohort.result()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"n": n, "k": r.cohort.state.degree, "dropout": dropout, "survivors": n - len(gone),
            "fold_s": fold, "result_s": seconds, "peak_bytes": peak}


def print_server(rows: list[dict], fold: float) -> None:
    print(f"\n3. Server per round (vector of {VECTOR:,} values = {4 * VECTOR / 1e6:.2f} MB as uint32; "
          f"ratios to one float32 fold, {fold * 1e3:.2f} ms)")
    print("| n | k | dropped before upload | fold all uploads | unmask (`result`) | peak memory of `result` |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['n']} | {row['k']} | {row['n'] - row['survivors']} | {row['fold_s'] * 1e3:.0f} ms "
              f"({row['fold_s'] / fold:.0f}×) | {row['result_s'] * 1e3:.0f} ms ({row['result_s'] / fold:.0f}×) | "
              f"{row['peak_bytes'] / 1e6:.1f} MB ({row['peak_bytes'] / (4 * VECTOR):.1f} vectors) |")


def success_rate(root: Path, n: int, degree: int | None, dropouts, trials: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    k = graph.default_degree(n, 0.2) if degree is None else degree
    for p in dropouts:
        ok, reasons = 0, {}
        for trial in range(trials):
            folder = root / f"s{n}-{p}-{trial}"
            r = InProcessRound(folder, n, length=8, bits=16, degree=k, min_survivors=2, tolerated_dropout=0.0,
                               round_id=ROUND + trial)
            r.advertise()
            r.share()
            r.receive()
            try:
                for d in r.inboxes:
                    if rng.random() >= p:
                        r.cohort.fold(d, r.devices[d].mask(np.ones(8, np.uint32)))
                for d, request in r.cohort.close_input().items():
                    r.cohort.receive_unmask(d, r.devices[d].unmask(request))
                r.cohort.result()
                ok += 1
            except CohortAbandoned as err:
                reasons[err.reason] = reasons.get(err.reason, 0) + 1
            shutil.rmtree(folder)
        rows.append({"n": n, "k": k, "p": p, "trials": trials, "published": ok, "reasons": reasons,
                     "predicted": max(0.0, 1.0 - n * graph.unmaskable_tail(k, p)) if k < n - 1 else None})
    return rows


def print_success(rows: list[dict]) -> None:
    print("\n4. Rounds that publish when each device drops before its masked upload with probability p")
    print("| n | k | t | p | published | why the others were abandoned | union bound (k < n − 1) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(row["reasons"].items())) or "—"
        bound = "—" if row["predicted"] is None else f"≥ {row['predicted']:.3f}"
        print(f"| {row['n']} | {row['k']} | {row['k'] // 2 + 1} | {row['p']:.2f} | {row['published']}/{row['trials']} "
              f"| {why} | {bound} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0x5EC)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="bench-secagg-", dir=shm))
    try:
        fold = float32_fold_seconds(15)
        cohorts = [26, 100, 1000]
        sizes = [message_bytes(n, min(graph.default_degree(n, 0.2), n - 1)) for n in cohorts]
        print_bytes(sizes)
        degrees = (4, 25) if args.quick else (4, 10, 25, 50, 84)
        cpu = device_cpu(root, degrees, 1 if args.quick else 3)
        print_device_cpu(cpu, fold)
        plans = [(26, None, 0.0), (26, None, 0.2)] + ([] if args.quick else [(60, 20, 0.0), (60, 20, 0.2)])
        servers = [server_round(root / f"server-{i}", n, k, p, rng) for i, (n, k, p) in enumerate(plans)]
        print_server(servers, fold)
        ps = (0.1, 0.3) if args.quick else (0.05, 0.1, 0.2, 0.3, 0.4)
        trials = 3 if args.quick else 20
        success = [row for n, k in ((60, 20), (60, None)) for row in success_rate(root, n, k, ps, trials, rng)]
        print_success(success)
        if args.out:
            args.out.write_text(json.dumps({"float32_fold_s": fold, "bytes": sizes, "device_cpu": cpu,
                                            "server": servers, "success": success}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
