"""Compare model versions on the same word boundaries: top-1 and its difference from a reference,
with the paired standard error, and word perplexity.

`fedkb evaluate` gives each model's top-1 with a sampling error of about ±0.0023 at 8,000
boundaries; the difference of two such figures errs by about ±0.0033 if the two samples were
independent. But the boundaries depend only on the data and the seed, so two models are scored on
the same ones, and the difference's standard error is that of the per-boundary differences
(hit_a − hit_b), which is small when the models agree on most boundaries. That is what lets a
1 % relative difference in top-1 (±0.0005 at 0.046) be resolved at all. Used for issue 15's
encodings and issue 16's secure aggregation against the float32 run of the same deterministic
fleet (docs: README, "Compressed updates" and "Secure aggregation").

Usage:
    python bench/paired_eval.py --data runs/data --words 8000 --windows 8192 \\
        runs/q-float32/server/models/61 runs/q-h8a/server/models/61 ...
The first model is the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from datasets.prepared import load_prepared  # noqa: E402
from datasets.tokenizer import load_tokenizer, word_start_table  # noqa: E402
from edge_runtime.litert_model import TrainableModel  # noqa: E402
from model.evaluation import EvalConfig, evaluate_with_hits  # noqa: E402


def paired(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean of other_top1 − reference_top1, its standard error) over the shared boundaries."""
    diff = (other == 0).astype(np.float64) - (reference == 0).astype(np.float64)
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="model version folders; the first is the reference")
    parser.add_argument("--data", required=True, type=Path, help="a folder from `fedkb data prepare`")
    parser.add_argument("--words", type=int, default=8000)
    parser.add_argument("--windows", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    data = load_prepared(args.data)
    word_start = word_start_table(load_tokenizer(data.tokenizer_path))
    streams = {c: s for c, s in data.heldout.items() if len(s) > 1}  # as `fedkb evaluate` does
    rows, reference = [], None
    for folder in args.models:
        model = TrainableModel(folder)
        config = EvalConfig(seq_len=model.seq_len, max_windows=args.windows, recall_samples=args.words, seed=args.seed)
        result, hits = evaluate_with_hits(model.get_weights(), streams, word_start, config)
        if reference is None:
            reference = hits
        diff, se = paired(reference, hits)
        rows.append({"model": str(folder), "top1": result.top1, "top3": result.top3,
                     "word_perplexity": result.word_perplexity, "boundaries": len(hits),
                     "top1_minus_reference": diff, "paired_se": se,
                     "relative": diff / max(float((reference == 0).mean()), 1e-12)})
        print(f"{folder}: top-1 {result.top1:.4f}, top-3 {result.top3:.4f}, word perplexity "
              f"{result.word_perplexity:,.0f}; vs the reference {diff:+.4f} ± {se:.4f} "
              f"({rows[-1]['relative']:+.1%}) on {len(hits)} boundaries", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
