"""`fedkb evaluate`: the keyboard metrics of a model folder on a prepared dataset.

The weights are read from the version's trainable model through LiteRT (`get_weights`), so
any model folder works: an export, a version the server published, or one a device downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="token/word perplexity and top-1/top-3 next-word recall of a model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model folder (manifest.json, trainable.tflite)")
    parser.add_argument("--data", required=True, type=Path, help="a folder from `fedkb data prepare`")
    parser.add_argument("--split", choices=("heldout", "test", "train"), default="heldout",
                        help="which clients to evaluate on (default: heldout, never trained on)")
    parser.add_argument("--windows", type=int, default=512, help="windows sampled for perplexity (default: 512)")
    parser.add_argument("--words", type=int, default=200, help="word boundaries sampled for top-k recall (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from datasets.prepared import load_prepared
    from datasets.tokenizer import load_tokenizer, word_start_table
    from edge_runtime.litert_model import TrainableModel
    from fedkb_core.errors import FedkbError
    from model.evaluation import EvalConfig, evaluate_weights

    if args.windows < 1 or args.words < 1:
        raise FedkbError("--windows and --words must be at least 1")
    model = TrainableModel(args.model)
    data = load_prepared(args.data)
    if model.manifest.tokenizer_sha256 != data.stats.get("tokenizer_sha256"):
        raise FedkbError(f"{args.model} and {args.data} use different tokenizers: evaluate a model on data "
                         "prepared with its own tokenizer")
    streams = {c: s for c, s in getattr(data, args.split).items() if len(s) > 1}
    if not streams:
        raise FedkbError(f"{args.data}: the {args.split} split has no clients with text")
    config = EvalConfig(seq_len=model.seq_len, max_windows=args.windows, recall_samples=args.words, seed=args.seed)
    result = evaluate_weights(model.get_weights(), streams, word_start_table(load_tokenizer(data.tokenizer_path)),
                              config)
    body = {"model_version": model.version, "split": args.split, "clients": len(streams), **dataclasses.asdict(result)}
    if args.format == "json":
        print(json.dumps(body))
    else:
        print(f"model version {model.version} on {len(streams)} {args.split} clients: "
              f"token perplexity {result.token_perplexity:.2f}, word perplexity {result.word_perplexity:.2f}, "
              f"top-1 {result.top1:.3f}, top-3 {result.top3:.3f}")
    return 0
