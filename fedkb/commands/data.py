"""`fedkb data prepare`: turn a corpus into per-client splits, a tokenizer and stats.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare federated text data", description=__doc__)
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    prepare = data_sub.add_parser(
        "prepare",
        help="split a corpus by client, train the tokenizer, write the token streams",
        description="Split a corpus by client (last 20%% of each client's text to test, some clients "
        "held out), train a SentencePiece tokenizer on the training text only, and write "
        "tokenizer.model, train/test/heldout.npz and stats.json to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from datasets.sources import DATASET_HELP

    prepare.add_argument("--dataset", default="shakespeare", help=DATASET_HELP)
    prepare.add_argument("--out", required=True, type=Path, help="output folder")
    prepare.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary size (soft limit)")
    prepare.add_argument("--min-words", type=int, default=64, help="drop clients with fewer words")
    prepare.add_argument("--test-fraction", type=float, default=0.2, help="share of each client's text kept for testing")
    prepare.add_argument("--heldout-fraction", type=float, default=0.1, help="share of clients never trained on")
    prepare.add_argument("--max-clients", type=int, default=None, help="keep only this many training clients (quick runs)")
    prepare.add_argument("--seed", type=int, default=0, help="seed for choosing held-out clients")
    prepare.add_argument("--format", choices=("text", "json"), default="text", help="output format of the summary")
    prepare.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from datasets.prepare import PrepareConfig, prepare_dataset
    from datasets.splits import SplitConfig
    from fedkb_core.errors import FedkbError

    if args.max_clients is not None and args.max_clients < 1:
        raise FedkbError(f"--max-clients must be at least 1, got {args.max_clients}")
    try:
        split = SplitConfig(min_words=args.min_words, test_fraction=args.test_fraction,
                            heldout_fraction=args.heldout_fraction, seed=args.seed)
    except ValueError as err:
        raise FedkbError(str(err)) from None
    config = PrepareConfig(dataset=args.dataset, vocab_size=args.vocab_size, split=split, max_clients=args.max_clients)
    stats = prepare_dataset(config, args.out)
    if args.format == "json":
        print(json.dumps(stats, indent=2))
    else:
        q = stats["words_per_client"]
        print(f"{stats['num_clients']} clients ({stats['num_train_clients']} training, "
              f"{stats['num_heldout_clients']} held out; {stats['num_dropped_clients']} dropped under "
              f"{args.min_words} words), {stats['num_words']:,} words, {stats['num_tokens']:,} tokens, "
              f"vocabulary {stats['vocab_size']}")
        print(f"words per client: median {q['p50']:.0f}, p10 {q['p10']:.0f}, p90 {q['p90']:.0f}")
        skipped = stats["load_report"]["skipped"]
        if skipped:
            print("skipped: " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()))
        print(f"wrote {args.out}/ (tokenizer.model, train/test/heldout.npz, stats.json)")
    return 0
