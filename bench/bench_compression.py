"""Compressed updates benchmark: bytes, error and CPU of every update encoding on a real update.

The update is one device's real training job on Shakespeare (the heaviest training role's first
64 windows, the default task: device SGD at lr 1.0, one epoch, clipped to C = 1), run by the
edge runtime's own LiteRT trainer on an exported default-size model. For float32, float16 and
hadamard at b = 8, 4, 2, 1 it prints:
    - bytes per update, headers included, and the ratio to float32;
    - the relative L2 error ‖Δ̂ − Δ‖/‖Δ‖ of one encoding;
    - the relative L2 error of the mean of m = 1, 4, 16, 64 encodings of the update (independent
      rounding, one rotation seed, as within a round): unbiased errors fall like 1/√m;
    - device encode time (`encode_update`); the server's accept check (the upload route's
      validation and norm); its decode + fold as `aggregator/folding.py` does it (float32: the
      folder's zero-copy path; hadamard: decoded but not rotated back, added to the rotated
      float64 sum, plus a 20th of the one inverse rotation of the sum per round of 20 updates);
      and for hadamard the alternative of rotating every update back before folding. All as
      ratios to float32's decode + fold in the same run.
Timings are medians of --repeats runs.

Usage:
    nice python bench/bench_compression.py --model runs/model --data runs/data [--out result.json]
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

import numpy as np  # noqa: E402

ENCODINGS = (("float32", None), ("float16", None), ("hadamard", 8), ("hadamard", 4), ("hadamard", 2),
             ("hadamard", 1))
MEANS = (1, 4, 16, 64)
ROUND_UPDATES = 20  # the default goal: one inverse rotation of the sum per this many updates


def real_update(model_dir: Path, data_dir: Path):
    """One clipped update of the default task, trained with LiteRT as `fedkb device` trains."""
    from datasets.prepared import load_prepared
    from datasets.tokenizer import load_tokenizer  # noqa: F401  (the prepared folder's tokens are ids already)
    from datasets.windows import make_windows
    from edge_runtime.litert_model import TrainableModel
    from edge_runtime.trainer import train_local
    from fedkb_core.protocol import RoundTask
    from fedkb_core.training_config import TRAINING

    prepared = load_prepared(data_dir)
    tokens = max(prepared.train.values(), key=len)
    model = TrainableModel(model_dir)
    task = RoundTask(round_id=1, model_version=1, learning_rate=TRAINING.device_lr, epochs=TRAINING.device_epochs,
                     batch_size=model.batch_size, max_examples=TRAINING.device_max_examples,
                     clip_norm=TRAINING.clip_norm, deadline=time.time() + 3600)
    update = train_local(model, model.get_weights(), make_windows(tokens, model.seq_len), task, seed=0)
    return update, list(model.manifest.weights)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(tensors[k]).astype(np.float64) for k in sorted(tensors)])


def measure(update, specs, repeats: int) -> dict:
    from aggregator.fedavg import ClippedSum, WeightedSum
    from aggregator.folding import Folder
    from fedkb_core import hadamard
    from fedkb_core.clipping import global_norm, squared_norm
    from fedkb_core.wire import UpdateMetadata, decode_rotated, decode_update, encode_update

    exact = _flat(update.deltas)
    norm = float(np.linalg.norm(exact))
    shapes = {s.name: s.shape for s in sorted(specs, key=lambda s: s.name)}
    seed = 0x5EED
    rows = {}
    for encoding, bits in ENCODINGS:
        meta = UpdateMetadata(round_id=1, model_version=1, device_id="bench", num_examples=update.num_examples,
                              clip_norm=update.clip_norm, update_norm=update.update_norm, encoding=encoding,
                              update_bits=bits, rotation_seed=seed if bits else None)
        rng = np.random.default_rng(1)
        body = encode_update(update.deltas, meta, rng=rng)
        encode_s = _median_seconds(lambda: encode_update(update.deltas, meta, rng=rng), repeats)
        one = _flat(decode_update(body, specs).deltas)
        mean_errors, total = {}, np.zeros_like(exact)
        for m in range(1, max(MEANS) + 1):
            total += one if m == 1 else _flat(decode_update(encode_update(update.deltas, meta, rng=rng), specs).deltas)
            if m in MEANS:
                mean_errors[m] = float(np.linalg.norm(total / m - exact)) / norm

        clipped = ClippedSum(WeightedSum(shapes), update.clip_norm * 1.5)
        row = {"bytes": len(body), "relative_l2_error": mean_errors[1], "mean_errors": mean_errors,
               "encode_s": encode_s}
        if encoding == "float32":
            raw = memoryview(bytearray(body))

            def fold():  # the folder's zero-copy path
                clipped.add_flat(Folder._flat_float32(raw, specs, clipped.inner.layout), update.num_examples)

            def accept():  # the upload route's validation and norm
                global_norm(decode_update(body, specs).deltas)
        elif encoding == "float16":
            def fold():
                clipped.add(decode_update(body, specs).deltas, update.num_examples)

            def accept():
                global_norm(decode_update(body, specs).deltas)
        else:
            rotated = ClippedSum(WeightedSum({"rotated": (hadamard.padded_length(exact.size),)}),
                                 update.clip_norm * 1.5)
            blocks = rotated.inner.flat.reshape(-1, hadamard.BLOCK)

            def fold():  # as the folder does: decoded, not rotated back; the sum rotates back per round
                rotated.add_flat(decode_rotated(body, specs).values, update.num_examples)

            def accept():
                squared_norm(decode_rotated(body, specs).values)

            def decode_back_fold():  # the alternative: every update rotated back, then folded
                clipped.add(decode_update(body, specs).deltas, update.num_examples)

            row["rotate_back_s"] = _median_seconds(lambda: hadamard.unrotate(blocks, seed, exact.size), repeats)
            row["decode_back_fold_s"] = _median_seconds(decode_back_fold, repeats)
        row["fold_s"] = _median_seconds(fold, repeats) + row.get("rotate_back_s", 0.0) / ROUND_UPDATES
        row["accept_s"] = _median_seconds(accept, repeats)
        rows[encoding if bits is None else f"{encoding}{bits}"] = row
    return {"num_parameters": int(exact.size), "update_norm": norm, "num_examples": update.num_examples,
            "repeats": repeats, "encodings": rows}


def print_table(result: dict) -> None:
    rows = result["encodings"]
    base_bytes, base = rows["float32"]["bytes"], rows["float32"]["fold_s"]

    def timed(seconds: float) -> str:
        return f"{1000 * seconds:.1f} ms ({seconds / base:.1f}x)"

    print(f"one real update: {result['num_parameters']:,} parameters, {result['num_examples']} examples, "
          f"norm {result['update_norm']:.3f}; float32 decode + fold {1000 * base:.1f} ms = 1x; "
          f"medians of {result['repeats']}")
    means = " | ".join(f"m = {m}" for m in MEANS)
    print(f"| encoding | bytes | vs float32 | rel. L2 error, one update | error of the mean of m: {means} | "
          "device encode | server accept check | server decode + fold | decode back each + fold |")
    print("|" + "---|" * (8 + len(MEANS)))
    for name, r in rows.items():
        errors = " | ".join(f"{r['mean_errors'][m]:.4f}" for m in MEANS)
        back = timed(r["decode_back_fold_s"]) if "decode_back_fold_s" in r else "—"
        print(f"| {name} | {r['bytes']:,} | {r['bytes'] / base_bytes:.4f} | {r['relative_l2_error']:.4f} | {errors} | "
              f"{timed(r['encode_s'])} | {timed(r['accept_s'])} | {timed(r['fold_s'])} | {back} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a folder written by `fedkb export`")
    parser.add_argument("--data", type=Path, required=True, help="a folder from `fedkb data prepare`")
    parser.add_argument("--repeats", type=int, default=7, help="timing repetitions (median)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    update, specs = real_update(args.model, args.data)
    result = measure(update, specs, args.repeats)
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
