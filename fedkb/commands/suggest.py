"""`fedkb suggest`: the top next words for a typed prefix, from a model folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "suggest", help="suggest the next words for a typed prefix",
        description="Run the model folder's inference.tflite in LiteRT (as a phone would) and print "
        "the top next words after PREFIX.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prefix", help='typed text, e.g. "to be or not to"')
    parser.add_argument("--model", required=True, type=Path, help="model folder (manifest.json, inference.tflite)")
    parser.add_argument("-k", type=int, default=3, help="number of suggestions")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fedkb_core.errors import FedkbError
    from edge_runtime.suggest import Suggester

    if args.k < 1:
        raise FedkbError(f"-k must be at least 1, got {args.k}")
    words = Suggester(args.model).suggest(args.prefix, k=args.k)
    print(json.dumps({"prefix": args.prefix, "suggestions": words}) if args.format == "json" else "  ".join(words))
    return 0
