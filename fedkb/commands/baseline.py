"""`fedkb baseline`: centralized training, the reference federated training should reach."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model-size flags shared by the commands that build a model."""
    group = parser.add_argument_group("model size")
    group.add_argument("--embed-dim", type=int, default=96, help="embedding (and projection) size")
    group.add_argument("--lstm-units", type=int, default=256, help="LSTM units")
    group.add_argument("--batch-size", type=int, default=16, help="B of the on-device training batch")
    group.add_argument("--seq-len", type=int, default=20, help="T: tokens per training window")
    group.add_argument("--model-seed", type=int, default=0, help="seed of the initial weights")


def model_config_from_args(args, vocab_size: int):
    from fedkb_core.errors import FedkbError
    from model.config import ModelConfig

    try:
        return ModelConfig(vocab_size=vocab_size, embed_dim=args.embed_dim, lstm_units=args.lstm_units,
                           batch_size=args.batch_size, seq_len=args.seq_len, seed=args.model_seed)
    except ValueError as err:
        raise FedkbError(str(err)) from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "baseline", help="train centrally on the pooled training clients (the upper reference)",
        description="Train the next-word LSTM centrally (Adam) on all training clients' text, then "
        "evaluate on the clients' test splits and the held-out clients. Writes metrics.json and "
        "weights.safetensors (usable with `fedkb export --from-weights`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="folder written by `fedkb data prepare`")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--train-batch", type=int, default=64, help="centralized batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from datasets.prepared import load_prepared
    from model.baseline import BaselineConfig, train_baseline

    data = load_prepared(args.data)
    model_config = model_config_from_args(args, data.vocab_size)
    metrics = train_baseline(args.data, args.out, model_config=model_config, config=BaselineConfig(
        epochs=args.epochs, max_steps=args.steps, batch_size=args.train_batch, learning_rate=args.lr, seed=args.seed))
    h = metrics["heldout"]
    print(f"baseline: {metrics['train']['steps']} steps in {metrics['train']['seconds']} s; held-out: word "
          f"perplexity {h['word_perplexity']:.1f}, token perplexity {h['token_perplexity']:.1f}, "
          f"top-1 {h['top1']:.3f}, top-3 {h['top3']:.3f}")
    print(f"wrote {args.out}/metrics.json and {args.out}/weights.safetensors")
    return 0
