"""The privacy-utility table: a DP mechanism at noise multiplier Z x clients per round, on Shakespeare.

Each cell is one `fedkb simulate` run with the same seed and the same number of rounds, then a
precise evaluation of the last version with `fedkb evaluate` (the per-round figures of report.json
sample too few word boundaries to compare cells). Alongside: the ε the server's accountant reported
(with its assumption), the noise-to-signal ratio Z·√d/m of the released mean (noise of standard
deviation Z·C/m per coordinate against a mean update of norm at most C), and, computed by the
accountant alone, the ε the same Z gives DP-FedAvg at a production keyboard's scale.

The mechanisms (`--mechanisms`):
* `fedavg`: DP-FedAvg with a fixed clip C, FedAdam on the server (the defaults);
* `adaptive`: the same with adaptive clipping (`--dp-adaptive-clipping`, its defaults: quantile
  0.5, learning rate 0.2, σ_b = m/20), C = 1 at the start;
* `ftrl`: DP-FTRL (`--dp-mechanism ftrl`). FTRL is the server's optimizer, so it cannot run with
  FedAdam: server SGD at rate `--ftrl-lr` with momentum `--ftrl-momentum`, and a minimum separation
  `--min-separation` between a device's contributions, which is what its ε rests on (no sampling
  assumption). Z = 0 is FTRL without noise, the reference for what the noise costs it.

    python bench/privacy_utility.py --data runs/demo/data --out runs/privacy --rounds 10
    python bench/privacy_utility.py --data runs/demo/data --out runs/privacy --rounds 10 \\
        --mechanisms ftrl,adaptive --only ftrl:0.5:100,adaptive:1:100

Cells already simulated (their folder has a report.json) are not run again, nor evaluated again.
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
MECHANISMS = ("fedavg", "adaptive", "ftrl")


def cell_folder(out: Path, mechanism: str, z: float, m: int) -> Path:
    """DP-FedAvg's cells keep the folder names of the first table (z{Z}-m{m})."""
    return out / (f"z{z:g}-m{m}" if mechanism == "fedavg" else f"{mechanism}-z{z:g}-m{m}")


def mechanism_arguments(args, mechanism: str) -> list[str]:
    if mechanism == "adaptive":
        return ["--dp-adaptive-clipping"]
    if mechanism == "ftrl":
        return ["--dp-mechanism", "ftrl", "--server-optimizer", "sgd", "--server-lr", str(args.ftrl_lr),
                "--server-momentum", str(args.ftrl_momentum), "--dp-min-separation", str(args.min_separation)]
    return []


def evaluate(args, out: Path, version: int) -> dict:
    """`fedkb evaluate` of the cell's last version, kept in the cell's folder for the next table."""
    cached = out / f"evaluate-v{version}-w{args.words}-n{args.windows}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    evaluated = subprocess.run([*FEDKB, "evaluate", "--model", str(out / "server" / "models" / str(version)),
                                "--data", str(args.data), "--words", str(args.words), "--windows", str(args.windows),
                                "--format", "json"], check=True, capture_output=True, text=True)
    cached.write_text(evaluated.stdout)
    return json.loads(evaluated.stdout)


def run_cell(args, mechanism: str, z: float, m: int) -> dict:
    out = cell_folder(args.out, mechanism, z, m)
    if not (out / "report.json").is_file():
        cmd = [*FEDKB, "simulate", "--data", str(args.data), "--out", str(out), "--clients", str(args.clients),
               "--clients-per-round", str(m), "--rounds", str(args.rounds), "--seed", "0",
               "--dp-noise-multiplier", str(z), "--dp-population", str(args.clients), "--workers", str(args.workers),
               *mechanism_arguments(args, mechanism)]
        print("  " + " ".join(cmd[2:]), file=sys.stderr)
        started = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  {mechanism} z={z:g} m={m}: simulated in {time.monotonic() - started:.0f} s", file=sys.stderr)
    report = json.loads((out / "report.json").read_text())
    version = report["summary"]["final_model_version"]
    metrics = evaluate(args, out, version)
    manifest = json.loads((out / "server" / "models" / str(version) / "manifest.json").read_text())
    metrics["parameters"] = sum(math.prod(w["shape"]) for w in manifest["weights"])
    privacy = report["summary"].get("privacy") or {}
    clients = [r["clients"] for r in report["rounds"][1:]]
    return {"mechanism": mechanism, "z": z, "m": m, "metrics": metrics, "privacy": privacy, "version": version,
            "seconds": report["summary"]["seconds"], "clients": clients}


def parse_only(text: str | None) -> set[tuple[str, float, int]] | None:
    """`mechanism:Z:m,...` cells, or None for every cell of the grid."""
    if not text:
        return None
    cells = set()
    for item in text.split(","):
        try:
            mechanism, z, m = item.split(":")
            cells.add((mechanism, float(z), int(m)))
        except ValueError:
            raise SystemExit(f"--only: {item!r} is not mechanism:Z:m (e.g. ftrl:0.5:100)") from None
        if mechanism not in MECHANISMS:
            raise SystemExit(f"--only: unknown mechanism {mechanism!r}; expected one of {', '.join(MECHANISMS)}")
    return cells


def clip_text(cell: dict) -> str:
    """The clip norm the last release used (adaptive clipping moves it)."""
    clip = cell["privacy"].get("clip_norm")
    return "—" if clip is None else f"{clip:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a `fedkb data prepare --dataset shakespeare` folder")
    p.add_argument("--out", type=Path, default=Path("runs/privacy"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=846, help="population N (Shakespeare has 846 training roles)")
    p.add_argument("--z", default="0,0.3,0.5,1", help="noise multipliers")
    p.add_argument("--m", default="20,100", help="clients per round")
    p.add_argument("--mechanisms", default="fedavg", help=f"comma-separated, of {', '.join(MECHANISMS)}")
    p.add_argument("--only", default=None, metavar="MECH:Z:m,...", help="run only these cells of the grid")
    p.add_argument("--ftrl-lr", type=float, default=1.0, help="DP-FTRL's server learning rate η")
    p.add_argument("--ftrl-momentum", type=float, default=0.9, help="DP-FTRL's server momentum γ")
    p.add_argument("--min-separation", type=int, default=1,
                   help="DP-FTRL: releases between two contributions of one device (enforced at check-in)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--words", type=int, default=2000)
    p.add_argument("--windows", type=int, default=2048)
    args = p.parse_args(argv)
    zs = [float(z) for z in args.z.split(",")]
    ms = [int(m) for m in args.m.split(",")]
    mechanisms = args.mechanisms.split(",")
    for mechanism in mechanisms:
        if mechanism not in MECHANISMS:
            p.error(f"--mechanisms: unknown {mechanism!r}; expected {', '.join(MECHANISMS)}")
    only = parse_only(args.only)
    grid = [(mech, z, m) for mech in mechanisms for m in ms for z in zs
            if not (mech == "adaptive" and z == 0)]  # adaptive clipping at Z = 0 is fixed-clip DP-FedAvg's Z = 0 row
    grid = [cell for cell in grid if only is None or cell in only]
    cells = [run_cell(args, *cell) for cell in grid]

    d = None
    print(f"\nShakespeare: {args.rounds} rounds, N = {args.clients}, seed 0, clip C = 1 (at the start, for adaptive); "
          f"held-out top-1 / word perplexity on {args.words} boundaries / {args.windows} windows")
    print("| mechanism | Z | clients per round m | top-1 | top-3 | word perplexity | ε (δ) | ε without amplification "
          "| accountant | last clip | Z·√d/m | updates per round | wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        mt, pr = c["metrics"], c["privacy"]
        d = d or mt.get("parameters")
        eps = pr.get("epsilon")
        eps_text = "∞ (no noise)" if eps is None else f"{eps:.3g} ({pr.get('delta'):.2g})"
        eps_full = pr.get("epsilon_without_amplification")
        nsr = f"{c['z'] * math.sqrt(d) / c['m']:.1f}" if d else "—"
        per_round = f"{min(c['clients'])}–{max(c['clients'])}" if c["clients"] else "—"
        print(f"| {c['mechanism']} | {c['z']:g} | {c['m']} | {mt['top1']:.4f} | {mt['top3']:.4f} | "
              f"{mt['word_perplexity']:,.0f} | {eps_text} | {'∞' if eps_full is None else f'{eps_full:.3g}'} | "
              f"{pr.get('accountant', '—')} | {clip_text(c)} | {nsr} | {per_round} | {c['seconds']:.0f} s |")
    for mechanism in dict.fromkeys(c["mechanism"] for c in cells):
        noised = [c for c in cells if c["mechanism"] == mechanism and c["privacy"].get("epsilon") is not None]
        sampling = next((c["privacy"].get("sampling") for c in noised or cells if c["mechanism"] == mechanism
                         and c["privacy"].get("sampling")), None)
        if sampling:
            print(f"\n{mechanism}: {sampling}")

    if "fedavg" in mechanisms:
        print("\nAccountant only (no training): DP-FedAvg at the same Z at a production keyboard's scale, "
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
