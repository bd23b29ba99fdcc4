"""Secure aggregation's integer encodings: error, bytes and CPU per bit width and cohort.

Two grids (fedkb_core/secagg/integer_encoding.py): the **tuned** grid (rounds without DP: r bits
per masked value, steps tuned to the sum's spread) and the **fixed** grid (DP: b bits, r = b +
⌈log₂ m⌉). The tuned rows come first: r = 8 at cohorts m = 20, 100, 1,000, each device's update
correlated with the others' (the cosine ρ between two devices' updates, 0.3 by default: federated
updates share a direction), the steps tuned from a first, calibration "round" of the same cohort
as the server tunes them, then the next round's sum decoded. They print the upload's payload bytes against
`hadamard` at 8 bits, the relative error of the decoded mean against the exact weighted mean,
the same for `hadamard` at 8 bits on the same devices, the fill (how many RMS the sum's range held)
and the blocks left out.

The update is, as in bench/bench_compression.py, one device's real training job on Shakespeare
(its `real_update`: the default task, LiteRT trainer, clipped to C = 1) when --model and --data
are given; without them, a synthetic Gaussian update of the default model's 1,162,144 parameters
at norm C (which flatters the common grid: see below). For b = 8, 10, 12, 16 and a cohort bound
m = 1, 20, 100 (r = b + ⌈log₂ m⌉) it prints:
    - r, the bits per coordinate of the masked upload, and the upload's payload bytes
      (`bitpack.packed_size` of the P + 1 coordinates at r bits; headers excluded) as a ratio to
      float32 (4n bytes) and to `hadamard` at 8 bits (P bytes + 4 per block);
    - the relative L2 error ‖Δ̂ − Δ‖/‖Δ‖ of one update's encoding (weight 1: n = n_max);
    - the relative L2 error of the decoded mean of m devices against the exact example-weighted
      mean Σ n_i·Δ_i / Σ n_i. Device i sends a_i·Δ (a_i uniform in [0.25, 1]: smaller updates,
      as from devices that trained less) with n_i uniform in 1..n_max, so the weight quantization
      shows; the mean's norm is then ~0.6‖Δ‖, and every device's error is independent;
    - device encode (`encode` + `bitpack.pack` at r bits), the server's fold of one upload
      (`bitpack.unpack` + `add_mod`) and its once-per-round decode (`decode_sum` + the inverse
      rotation), as ratios to a float32 fold measured in the same run (the float64 streaming
      sum's `+=` of one float32 update: the floor of any server fold).
The `hadamard8` rows are the plain (non-SecAgg) compressed encoding on the same devices, with
per-block scales and exact float weights: the error SecAgg's grid is compared to.

Why the common grid errs more than `hadamard` at the same b: its step is c/W with c fixed by C for
the whole cohort (c = C·√(2·ln(2d/δ)/d) ≈ 0.062·C), while `hadamard` takes each block's own
largest |y|: a real update's blocks span a factor of 1,750 in scale, and an update or a weight
below 1 is a smaller signal on the same grid. The error of one encoding is ≈ √(P/6)·c/W
whatever the update, relative ≈ that / ‖w·Δ‖.

Usage:
    nice python bench/bench_secagg_encoding.py                                    # synthetic
    nice python bench/bench_secagg_encoding.py --model runs/model --data runs/data  # a real update
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

BITS = (8, 10, 12, 16)
COHORTS = (1, 20, 100)
TUNED_BITS = (8, 10)
TUNED_COHORTS = (20, 100, 1000)
SYNTHETIC_PARAMETERS = 1_162_144  # the default export
SEED = 0x5EED


def synthetic_update(clip_norm: float) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=SYNTHETIC_PARAMETERS)
    return (x * (clip_norm / np.linalg.norm(x))).astype(np.float32)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _devices(m: int, max_examples: int):
    """(a_i, n_i) of the m devices of a cohort: update scale and examples."""
    rng = np.random.default_rng(1000 + m)
    return rng.uniform(0.25, 1.0, m), [int(n) for n in rng.integers(1, max_examples + 1, m)]


def measure(update: np.ndarray, num_examples: int, clip_norm: float, max_examples: int, repeats: int) -> dict:
    from fedkb_core import bitpack, hadamard, stochastic_rounding
    from fedkb_core.secagg import integer_encoding as ie

    n = update.size
    exact = update.astype(np.float64)
    norm = float(np.linalg.norm(exact))
    blocks = hadamard.num_blocks(n)
    float32_bytes = 4 * n
    hadamard8_bytes = bitpack.packed_size(hadamard.padded_length(n), 8) + 4 * blocks

    acc64 = np.zeros(n, np.float64)

    def float32_fold():
        np.add(acc64, update, out=acc64)

    reference_s = _median_seconds(float32_fold, repeats)

    def hadamard8(x, rng):
        levels, scales = stochastic_rounding.quantize(hadamard.rotate(x, SEED), 8, rng)
        return levels, scales

    def hadamard8_decode(levels, scales):
        return hadamard.unrotate(stochastic_rounding.dequantize(levels, scales, 8), SEED, n).astype(np.float64)

    rows = []
    rng = np.random.default_rng(1)
    # hadamard8: the reference encoding (plaintext: per-block scales, exact weights)
    one = hadamard8_decode(*hadamard8(update, rng))
    row = {"encoding": "hadamard8", "bits": 8, "cohort": None, "r": 8, "bytes": hadamard8_bytes,
           "one_error": float(np.linalg.norm(one - exact)) / norm, "mean_errors": {},
           "encode_s": _median_seconds(lambda: bitpack.pack(hadamard8(update, rng)[0].reshape(-1), 8), repeats)}
    for m in COHORTS:
        scale, counts = _devices(m, max_examples)
        total = np.zeros(n, np.float64)
        for a, c in zip(scale, counts):
            total += c * hadamard8_decode(*hadamard8((a * update).astype(np.float32), rng))
        target = exact * float(np.dot(scale, counts) / sum(counts))
        row["mean_errors"][m] = float(np.linalg.norm(total / sum(counts) - target) / np.linalg.norm(target))
    rows.append(row)

    for bits in BITS:
        for m in COHORTS:
            grid = ie.SecAggGrid.from_cohort(bits=bits, cohort=m, clip_norm=clip_norm, length=n, rotation_seed=SEED,
                                             max_examples=max_examples)
            r = grid.modulus_bits
            vector = ie.encode(update, num_examples, grid, rng)
            decoded = ie.decode_sum(vector, grid, count=1)
            one_error = float(np.linalg.norm(decoded.deltas(n) / decoded.weight - exact)) / norm

            scale, counts = _devices(m, max_examples)
            acc = np.zeros(grid.vector_length, np.uint32)
            for a, c in zip(scale, counts):
                vector = ie.encode((a * update).astype(np.float32), c, grid, rng)
                packed = bitpack.pack(vector[: grid.padded], r)
                ie.add_mod(acc[: grid.padded], bitpack.unpack(packed, r, grid.padded), ie.MASK_BITS)
                ie.add_mod(acc[grid.padded:], vector[grid.padded:], ie.MASK_BITS)
            total = ie.decode_sum(acc, grid, count=m)
            target = exact * float(np.dot(scale, counts) / sum(counts))
            mean_error = float(np.linalg.norm(total.deltas(n) / total.weight - target) / np.linalg.norm(target))

            packed = bitpack.pack(vector[: grid.padded], r)
            fold_acc = np.zeros(grid.padded, np.uint32)
            rows.append({
                "encoding": "secagg", "bits": bits, "cohort": m, "r": r, "bytes": packed.size + 4 * grid.tail_length,
                "one_error": one_error, "mean_errors": {m: mean_error},
                "encode_s": _median_seconds(
                    lambda: bitpack.pack(ie.encode(update, num_examples, grid, rng)[: grid.padded], r), repeats),
                "fold_s": _median_seconds(
                    lambda: ie.add_mod(fold_acc, bitpack.unpack(packed, r, grid.padded), ie.MASK_BITS), repeats),
                "decode_s": _median_seconds(lambda: ie.decode_sum(acc, grid, count=m).deltas(n), repeats),
            })
    return {"num_parameters": n, "update_norm": norm, "clip_norm": clip_norm, "num_examples": num_examples,
            "max_examples": max_examples, "float32_bytes": float32_bytes, "hadamard8_bytes": hadamard8_bytes,
            "float32_fold_s": reference_s, "repeats": repeats, "rows": rows}


def _cohort_update(update: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """One device's update: √ρ of `update`'s direction plus √(1 − ρ) of its own random one, at a
    norm uniform in [0.25, 1]·‖update‖ (two devices' updates then have cosine ≈ ρ)."""
    norm = float(np.linalg.norm(update))
    own = rng.normal(size=update.size)
    own *= 1.0 / np.linalg.norm(own)
    x = np.sqrt(rho) * update.astype(np.float64) / norm + np.sqrt(1.0 - rho) * own
    return (x * (rng.uniform(0.25, 1.0) * norm / np.linalg.norm(x))).astype(np.float32)


def measure_tuned(update: np.ndarray, clip_norm: float, max_examples: int, rho: float, cohorts, bits) -> list[dict]:
    """The tuned grid at r bits for cohorts of m correlated devices, as the server runs it: round 1
    calibrates on the fixed grid (b = CALIBRATION_BITS), round 2 runs on steps tuned from round 1's
    measured block spread."""
    from fedkb_core import bitpack, hadamard, stochastic_rounding
    from fedkb_core.secagg import integer_encoding as ie

    n = update.size
    blocks = hadamard.num_blocks(n)
    hadamard8_bytes = bitpack.packed_size(hadamard.padded_length(n), 8) + 4 * blocks
    rows = []
    for r in bits:
        for m in cohorts:
            if m > 100 and r != bits[0]:
                continue  # a cohort of 1,000 takes minutes: the first width only
            start = time.perf_counter()
            args = dict(bits=r, modulus_bits=r, clip_norm=clip_norm, length=n, rotation_seed=SEED,
                        max_examples=max_examples)
            grid = ie.SecAggGrid.from_cohort(bits=ie.CALIBRATION_BITS, cohort=m, clip_norm=clip_norm, length=n,
                                             rotation_seed=SEED, max_examples=max_examples)
            measured, result = None, {}
            for round_number in (1, 2):
                rng = np.random.default_rng(round_number * 7919 + m)
                acc = np.zeros(grid.vector_length, np.uint32)
                exact = np.zeros(n, np.float64)
                plain = np.zeros(n, np.float64)
                weights = 0
                for _ in range(m):
                    x = _cohort_update(update, rho, rng)
                    count = int(rng.integers(1, max_examples + 1))
                    vector = ie.encode(x, count, grid, rng)
                    ie.add_mod(acc, vector, ie.MASK_BITS)
                    exact += count * x.astype(np.float64)
                    weights += count
                    if round_number == 2:
                        levels, scales = stochastic_rounding.quantize(hadamard.rotate(x, SEED), 8, rng)
                        plain += count * hadamard.unrotate(stochastic_rounding.dequantize(levels, scales, 8), SEED, n)
                decoded = ie.decode_sum(acc, grid, count=m)
                if round_number == 1:
                    measured = [v / m for v in decoded.block_rms]
                    grid = ie.SecAggGrid(**args, tuned_steps=ie.tuned_steps(r, m, clip_norm, blocks, measured))
                    continue
                target = exact / weights
                mean = decoded.deltas(n) / decoded.weight
                result = {
                    "encoding": "secagg tuned", "bits": r, "cohort": m, "r": r, "rho": rho,
                    "bytes": bitpack.packed_size(grid.padded, r) + 4 * grid.tail_length,
                    "hadamard8_bytes": hadamard8_bytes,
                    "mean_error": float(np.linalg.norm(mean - target) / np.linalg.norm(target)),
                    "hadamard8_mean_error": float(np.linalg.norm(plain / weights - target) / np.linalg.norm(target)),
                    "fill": decoded.fill, "dropped_blocks": len(decoded.dropped_blocks), "blocks": blocks,
                    "seconds": time.perf_counter() - start,
                }
            rows.append(result)
            print(f"  tuned r = {r}, m = {m}: {result['seconds']:.0f} s", file=sys.stderr)
    return rows


def print_tuned(rows: list[dict]) -> None:
    print("| grid | r (bits per value) | m | upload bytes | vs hadamard8 | error of the weighted mean | hadamard8's, "
          "same devices | ratio | fill (RMS the range held) | blocks left out |")
    print("|" + "---|" * 10)
    for row in rows:
        print(f"| tuned | {row['r']} | {row['cohort']:,} | {row['bytes']:,} | {row['bytes'] / row['hadamard8_bytes']:.3f} | "
              f"{row['mean_error']:.4f} | {row['hadamard8_mean_error']:.5f} | "
              f"{row['mean_error'] / row['hadamard8_mean_error']:.0f}x | {row['fill']:.1f} | "
              f"{row['dropped_blocks']} of {row['blocks']} |")


def print_table(result: dict, source: str) -> None:
    base = result["float32_fold_s"]

    def timed(seconds):
        return "—" if seconds is None else f"{1000 * seconds:.1f} ms ({seconds / base:.1f}x)"

    print(f"{source}: {result['num_parameters']:,} parameters, norm {result['update_norm']:.3f} "
          f"(C = {result['clip_norm']:g}), {result['num_examples']} examples of n_max {result['max_examples']}; "
          f"float32 fold {1000 * base:.2f} ms = 1x; medians of {result['repeats']}")
    print("| encoding | b | m | r | bytes/coord | upload bytes | vs float32 | vs hadamard8 | rel. L2 error, one update "
          "| error of the weighted mean of m | device encode + pack | server unpack + fold | server decode (per round) |")
    print("|" + "---|" * 13)
    for row in result["rows"]:
        ratio32 = row["bytes"] / result["float32_bytes"]
        ratio8 = row["bytes"] / result["hadamard8_bytes"]
        if row["encoding"] == "hadamard8":
            means = ", ".join(f"{m}: {e:.4f}" for m, e in row["mean_errors"].items())
            print(f"| hadamard8 (plain) | 8 | any | — | {row['bytes'] / result['num_parameters']:.3f} | {row['bytes']:,} | "
                  f"{ratio32:.3f} | 1.000 | {row['one_error']:.4f} | {means} | {timed(row['encode_s'])} | — | — |")
            continue
        (m, error), = row["mean_errors"].items()
        print(f"| secagg | {row['bits']} | {m} | {row['r']} | {row['bytes'] / result['num_parameters']:.3f} | "
              f"{row['bytes']:,} | {ratio32:.3f} | {ratio8:.3f} | {row['one_error']:.4f} | {error:.4f} | "
              f"{timed(row['encode_s'])} | {timed(row['fold_s'])} | {timed(row['decode_s'])} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a folder written by `fedkb export`")
    parser.add_argument("--data", type=Path, default=None, help="a folder from `fedkb data prepare`")
    parser.add_argument("--repeats", type=int, default=5, help="timing repetitions (median)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--rho", type=float, default=0.3,
                        help="cosine between two devices' updates in the tuned rows (default 0.3)")
    parser.add_argument("--tuned-cohorts", default=",".join(map(str, TUNED_COHORTS)),
                        help="cohort sizes of the tuned rows (default 20,100,1000; 1,000 takes minutes)")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together (or neither, for a synthetic update)")
    from fedkb_core.training_config import TRAINING

    if args.model is not None:
        from bench_compression import real_update

        update, _ = real_update(args.model, args.data)
        flat = np.concatenate([np.ravel(update.deltas[k]).astype(np.float32) for k in sorted(update.deltas)])
        source = "one real update (Shakespeare, default task)"
        result = measure(flat, update.num_examples, update.clip_norm, TRAINING.device_max_examples, args.repeats)
    else:
        source = "synthetic Gaussian update at norm C"
        result = measure(synthetic_update(TRAINING.clip_norm), TRAINING.device_max_examples, TRAINING.clip_norm,
                         TRAINING.device_max_examples, args.repeats)
    flat_update, clip = (flat, update.clip_norm) if args.model is not None else (
        synthetic_update(TRAINING.clip_norm), TRAINING.clip_norm)
    cohorts = tuple(int(x) for x in args.tuned_cohorts.split(",") if x)
    tuned = measure_tuned(flat_update, clip, TRAINING.device_max_examples, args.rho, cohorts, TUNED_BITS)
    print(f"The tuned grid (no DP), {source}, devices at cosine {args.rho:g}, the second round of each cohort:")
    print_tuned(tuned)
    print()
    print("The fixed grid (DP):")
    print_table(result, source)
    if args.out:
        args.out.write_text(json.dumps({"source": source, **result, "tuned": tuned}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
