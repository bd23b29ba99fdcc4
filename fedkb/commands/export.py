"""`fedkb export`: write a trainable + inference TFLite model version with its manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedkb.commands.baseline import add_model_arguments, model_config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="convert the model to an on-device trainable TFLite version",
        description="Write trainable.tflite (train/evaluate/infer/get_weights/set_weights, builtin "
        "ops only), inference.tflite (stateful single-step, dynamic-range quantized by default), "
        "tokenizer.model, weights.safetensors and manifest.json to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder written by `fedkb data prepare`")
    parser.add_argument("--out", required=True, type=Path, help="output model folder")
    parser.add_argument("--from-weights", type=Path, default=None,
                        help="start from these weights (e.g. a baseline's weights.safetensors)")
    parser.add_argument("--version", type=int, default=1, help="model version number")
    parser.add_argument("--no-quantize", action="store_true", help="keep the inference model in float32")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from datasets.prepared import load_prepared
    from export.pipeline import export_model
    from fedkb_core.errors import FedkbError
    from model.weights import load_weights

    if args.version < 1:
        raise FedkbError(f"--version must be at least 1, got {args.version}")
    data = load_prepared(args.data)
    config = model_config_from_args(args, data.vocab_size)
    weights = load_weights(args.from_weights, config) if args.from_weights else None
    manifest = export_model(tokenizer_path=data.tokenizer_path, out_dir=args.out, config=config, weights=weights,
                            version=args.version, quantize=not args.no_quantize)
    sizes = ", ".join(f"{name} {entry.bytes / 1e6:.2f} MB" for name, entry in manifest.files.items())
    print(f"exported version {manifest.version} ({config.num_parameters:,} parameters) to {args.out}: {sizes}")
    return 0
