"""Centralized training on the pooled training clients: what federated training should reach.

The baseline sees all training text at once, shuffled, with Adam: the upper reference line on
every federated plot. Run with `fedkb baseline --data DIR --out DIR`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datasets.prepared import load_prepared
from datasets.tokenizer import load_tokenizer, word_start_table
from datasets.windows import concat_windows, iterate_batches, make_windows
from fedkb_core.errors import FedkbError
from model.config import ModelConfig
from model.evaluation import EvalConfig, evaluate_weights
from model.weights import save_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Centralized training settings."""

    epochs: int = 1
    max_steps: int | None = None  # stop early (quick runs); None = all epochs
    batch_size: int = 64
    learning_rate: float = 3e-3  # Adam
    seed: int = 0


def train_baseline(data_dir: Path, out_dir: Path, *, model_config: ModelConfig | None = None,
                   config: BaselineConfig = BaselineConfig(), eval_config: EvalConfig | None = None,
                   progress: bool | None = None) -> dict:
    """Train, evaluate on test splits and held-out clients, write metrics.json and weights.

    Raises:
        FedkbError: unreadable data or impossible settings.
    """
    import tensorflow as tf

    from model.keras_model import build_keras_model, get_keras_weights

    if config.epochs < 1 or (config.max_steps is not None and config.max_steps < 1):
        raise FedkbError("epochs and steps must be at least 1")
    data = load_prepared(data_dir)
    model_config = model_config or ModelConfig(vocab_size=data.vocab_size)
    if model_config.vocab_size != data.vocab_size:
        raise FedkbError(f"the model's vocabulary ({model_config.vocab_size}) differs from the data's ({data.vocab_size})")
    eval_config = eval_config or EvalConfig(seq_len=model_config.seq_len)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tf.keras.utils.set_random_seed(config.seed)

    windows = concat_windows([make_windows(s, model_config.seq_len) for s in data.train.values()])
    steps_per_epoch = math.ceil(len(windows) / config.batch_size)
    total_steps = min(config.max_steps or steps_per_epoch * config.epochs, steps_per_epoch * config.epochs)
    model = build_keras_model(model_config)
    optimizer = tf.keras.optimizers.Adam(config.learning_rate)

    @tf.function
    def train_step(x, y, mask):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            loss = tf.reduce_sum(nll * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    started = time.monotonic()
    losses = []
    bar = tqdm(total=total_steps, desc="baseline", unit="step", disable=None if progress is None else not progress)
    batches = iterate_batches(windows, batch_size=config.batch_size, seed=config.seed, epochs=config.epochs)
    for _, batch in zip(range(total_steps), batches):
        losses.append(float(train_step(batch.x, batch.y, batch.mask)))
        bar.update(1)
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    seconds = time.monotonic() - started

    weights = get_keras_weights(model)
    save_weights(out_dir / "weights.safetensors", weights, metadata={"kind": "centralized_baseline"})
    word_start = word_start_table(load_tokenizer(data.tokenizer_path))
    results = {
        "heldout": dataclasses.asdict(evaluate_weights(weights, data.heldout, word_start, eval_config)),
        "test": dataclasses.asdict(evaluate_weights(weights, {k: v for k, v in data.test.items() if len(v)},
                                                    word_start, eval_config)),
    }
    metrics = {
        "model_config": model_config.to_json(),
        "baseline_config": dataclasses.asdict(config),
        "eval_config": dataclasses.asdict(eval_config),
        "train": {"steps": len(losses), "windows": len(windows), "seconds": round(seconds, 1),
                  "loss_first": losses[0] if losses else None,
                  "loss_last_50": float(np.mean(losses[-50:])) if losses else None},
        **results,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("baseline: %d steps in %.0f s; held-out word perplexity %.1f, top-1 %.3f",
             len(losses), seconds, results["heldout"]["word_perplexity"], results["heldout"]["top1"])
    return metrics
