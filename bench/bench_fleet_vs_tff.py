"""Wall time per round: the full fedkb stack vs TensorFlow Federated's simulation, same work.

Runs `fedkb simulate` twice on the same prepared data and settings: once with the fedkb backend
(a real `fedkb serve` process, devices as edge-runtime LiteRT jobs in worker processes, updates
over loopback HTTP, publishing by flatbuffer rewrite) and once with `--backend tff`
(`build_weighted_fed_avg` with clipping, TFF's C++ executor). Each runs in its own process.

Both backends do the same work in every round: the fleet runs without over-selection
(`--over-selection 1.0`: the server hands out exactly the goal's tasks) and without dropout
(`--job-minutes 0`: no device's night ends mid-job), so the same eligible clients, in the same
seeded order, train on the same windows in both. The script prints what each backend did per
round (clients trained, windows, training steps, seconds) and says so if the work differs. The
time per round excludes evaluation in both (report.json `seconds` per round). Prints the
median and the ratio fedkb / TFF (target: <= 1.0). Absolute seconds depend on the machine and
on its load; the ratio is the comparable number.

Usage:
    python bench/bench_fleet_vs_tff.py                 # Shakespeare, default model size
    python bench/bench_fleet_vs_tff.py --quick         # tiny model, a few seconds
    python bench/bench_fleet_vs_tff.py --data runs/demo/data --clients-per-round 20 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FEDKB = Path(sys.executable).with_name("fedkb")
TINY = ["--embed-dim", "8", "--lstm-units", "16", "--batch-size", "4", "--seq-len", "6"]
SAME_WORK = ["--over-selection", "1.0", "--job-minutes", "0"]  # the fleet's only extra work: none here


def _run(args: list[str]) -> dict:
    result = subprocess.run([str(FEDKB), "-q", "simulate", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"fedkb simulate failed:\n{result.stderr[-2000:]}")
    return json.loads((Path(args[args.index("--out") + 1]) / "report.json").read_text())


def work(report: dict) -> list[tuple[int, int, int]]:
    """(clients trained, windows, training steps) per round."""
    return [(r["clients"], r["examples"], r["steps"]) for r in report["rounds"][1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="a prepared folder (default: prepare Shakespeare)")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model (checks the script, not the stack)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedkb-bench-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            vocab = ["--vocab-size", "500"] if args.quick else []
            subprocess.run([str(FEDKB), "-q", "data", "prepare", "--dataset", "shakespeare", "--out", str(data),
                            *vocab], check=True)
        common = ["--data", str(data), "--clients", str(args.clients), "--clients-per-round",
                  str(args.clients_per_round), "--rounds", str(args.rounds), "--eval-windows", "32",
                  "--eval-words", "10", *(TINY if args.quick else [])]
        reports = {}
        for backend in ("fedkb", "tff"):
            extra = ["--workers", str(args.workers), *SAME_WORK] if backend == "fedkb" else []
            reports[backend] = _run([*common, "--backend", backend, "--out", str(Path(tmp) / backend), *extra])

    print(f"{'round':>5} {'backend':8} {'clients':>7} {'windows':>8} {'steps':>6} {'seconds':>8}")
    for i in range(args.rounds):
        for b in ("fedkb", "tff"):
            r = reports[b]["rounds"][i + 1]
            print(f"{i + 1:5d} {b:8} {r['clients']:7d} {r['examples']:8d} {r['steps']:6d} {r['seconds']:8.2f}")
    same = work(reports["fedkb"]) == work(reports["tff"])
    print("same work per round in both backends" if same else
          "WARNING: the backends did different work (see above): the ratio compares unequal rounds")
    per_round = {b: statistics.median(r["seconds"] for r in rep["rounds"][1:]) for b, rep in reports.items()}
    print(f"median s/round: fedkb {per_round['fedkb']:.2f}, tff {per_round['tff']:.2f}")
    print(f"ratio fedkb / tff: {per_round['fedkb'] / per_round['tff']:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
