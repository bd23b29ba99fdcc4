"""The privacy-utility table: DP-FedAvg at noise multiplier Z x clients per round, on Shakespeare.

Each cell is one `fedkb simulate` run with the same seed and the same number of rounds, then a
precise evaluation of the last version with `fedkb evaluate` (the per-round figures of report.json
sample too few word boundaries to compare cells). Alongside: the ε the server's accountant reported
(with its sampling assumption), the noise-to-signal ratio Z·√d/m of the released mean (noise of
standard deviation Z·C/m per coordinate against a mean update of norm at most C), and, computed by
the accountant alone, the ε the same Z gives at a production keyboard's scale.

    python bench/privacy_utility.py --data runs/demo/data --out runs/privacy --rounds 20
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedkb_core.privacy_accounting import dp_fedavg_spent  # noqa: E402

FEDKB = [sys.executable, "-m", "fedkb", "-q"]


def run_cell(args, z: float, m: int) -> dict:
    out = args.out / f"z{z:g}-m{m}"
    if not (out / "report.json").is_file():
        cmd = [*FEDKB, "simulate", "--data", str(args.data), "--out", str(out), "--clients", str(args.clients),
               "--clients-per-round", str(m), "--rounds", str(args.rounds), "--seed", "0",
               "--dp-noise-multiplier", str(z), "--dp-population", str(args.clients), "--workers", str(args.workers)]
        started = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  z={z:g} m={m}: simulated in {time.monotonic() - started:.0f} s", file=sys.stderr)
    report = json.loads((out / "report.json").read_text())
    version = report["summary"]["final_model_version"]
    evaluated = subprocess.run([*FEDKB, "evaluate", "--model", str(out / "server" / "models" / str(version)),
                                "--data", str(args.data), "--words", str(args.words), "--windows", str(args.windows),
                                "--format", "json"], check=True, capture_output=True, text=True)
    metrics = json.loads(evaluated.stdout)
    manifest = json.loads((out / "server" / "models" / str(version) / "manifest.json").read_text())
    metrics["parameters"] = sum(math.prod(w["shape"]) for w in manifest["weights"])
    privacy = report["summary"].get("privacy") or {}
    return {"z": z, "m": m, "metrics": metrics, "privacy": privacy, "version": version}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a `fedkb data prepare --dataset shakespeare` folder")
    p.add_argument("--out", type=Path, default=Path("runs/privacy"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=846, help="population N (Shakespeare has 846 training roles)")
    p.add_argument("--z", default="0,0.3,0.5,1", help="noise multipliers")
    p.add_argument("--m", default="20,100", help="clients per round")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--words", type=int, default=2000)
    p.add_argument("--windows", type=int, default=2048)
    args = p.parse_args(argv)
    zs = [float(z) for z in args.z.split(",")]
    ms = [int(m) for m in args.m.split(",")]

    cells = [run_cell(args, z, m) for m in ms for z in zs]
    d = None
    print(f"\nDP-FedAvg on Shakespeare: {args.rounds} rounds, N = {args.clients}, FedAdam defaults, clip C = 1; "
          f"held-out top-1 / word perplexity on {args.words} boundaries / {args.windows} windows")
    print("| Z | clients per round m | top-1 | top-3 | word perplexity | ε (δ) | ε without amplification | Z·√d/m |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cells:
        mt, pr = c["metrics"], c["privacy"]
        d = d or mt.get("parameters")
        eps = pr.get("epsilon")
        eps_text = "∞ (no noise)" if eps is None else f"{eps:.3g} ({pr.get('delta'):.2g})"
        eps_full = pr.get("epsilon_without_amplification")
        nsr = f"{c['z'] * math.sqrt(d) / c['m']:.1f}" if d else "—"
        print(f"| {c['z']:g} | {c['m']} | {mt['top1']:.4f} | {mt['top3']:.4f} | {mt['word_perplexity']:,.0f} | {eps_text} | "
              f"{'∞' if eps_full is None else f'{eps_full:.3g}'} | {nsr} |")
    if cells and cells[-1]["privacy"].get("sampling"):
        print(f"\nsampling assumption: {cells[-1]['privacy']['sampling']}")

    print("\nAccountant only (no training): the same Z at a production keyboard's scale, "
          "N = 10^7 devices, 5,000 per round, 2,000 rounds, δ = 1e-10")
    print("| Z | ε | ε without amplification |")
    print("|---|---|---|")
    for z in zs:
        if z <= 0:
            continue
        spent = dp_fedavg_spent(noise_multiplier=z, clip_norm=1.0, expected_cohort=5000, population=10**7,
                                rounds=2000, delta=1e-10)
        print(f"| {z:g} | {spent.epsilon:.3g} | {spent.epsilon_without_amplification:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
