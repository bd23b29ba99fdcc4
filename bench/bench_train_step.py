"""Train-step benchmark: the LiteRT trainable model vs the same SGD step in TensorFlow graph mode.

At the default size (V=8000, E=96, H=256, B=16, T=20), on the same random batch, same weights,
same machine and run, prints ms per `train` step for:
    - LiteRT (ai-edge-litert), the exported builtins-only trainable.tflite, XNNPACK on;
    - LiteRT with XNNPACK off (the plain builtin kernels), unless --skip-no-xnnpack;
    - TensorFlow: the exporter's own `TrainableLM.train` tf.function (the graph that is converted);
    - TensorFlow: the Keras model's compiled SGD step (model/keras_model.py), for reference;
and the ratios LiteRT / TF (target: <= 1.0) and XNNPACK off / on. Timing is interleaved in rounds
(each implementation runs a block of steps per round) and the per-round medians are reported, so
load from other processes on a shared machine hits every implementation alike.

Token ids are random (no tokenizer is needed to time a step). The first losses of all
implementations are printed too: they start from the same weights, so they must agree.

Usage:
    python bench/bench_train_step.py
    python bench/bench_train_step.py --threads 2 --rounds 5 --steps 10
    python bench/bench_train_step.py --lstm-units 128 --vocab-size 4000 --skip-no-xnnpack
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--lstm-units", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="LiteRT num_threads and TF intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation per round")
    parser.add_argument("--lr", type=float, default=1e-3, help="small, so repeated steps stay stable")
    parser.add_argument("--skip-no-xnnpack", action="store_true", help="do not time LiteRT without XNNPACK")
    return parser.parse_args()


def main() -> int:
    args = _parse_args()
    import tensorflow as tf

    # Before any op runs: the same thread budget as the interpreter gets.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from export.convert import convert_module
    from export.trainable import TrainableLM
    from model.config import ModelConfig
    from model.keras_model import build_keras_model, make_sgd_step
    from model.weights import initial_weights

    config = ModelConfig(vocab_size=args.vocab_size, embed_dim=args.embed_dim, lstm_units=args.lstm_units,
                         batch_size=args.batch_size, seq_len=args.seq_len)
    B, T, V = config.batch_size, config.seq_len, config.vocab_size
    rng = np.random.default_rng(0)
    x = rng.integers(4, V, (B, T)).astype(np.int32)
    y = rng.integers(4, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[-1, T // 2:] = 0.0  # a padded tail, as real batches have
    lr = np.float32(args.lr)
    weights = initial_weights(config)
    print(f"model: V={V} E={config.embed_dim} H={config.lstm_units} B={B} T={T}, "
          f"{config.num_parameters:,} parameters; {args.threads} threads; {os.cpu_count()} CPUs visible")

    started = time.monotonic()
    exported = TrainableLM(config, weights)
    flatbuffer = convert_module(exported, exported.signatures(), resource_variables=True)
    print(f"builtins-only conversion: {time.monotonic() - started:.1f} s, {len(flatbuffer) / 1e6:.2f} MB")

    def litert_step(resolver):
        interpreter = Interpreter(model_content=flatbuffer, num_threads=args.threads,
                                  experimental_op_resolver_type=resolver)
        train = interpreter.get_signature_runner("train")
        return lambda: float(train(x=x, y=y, mask=mask, lr=lr)["loss"])

    module = TrainableLM(config, weights)
    tf_args = (tf.constant(x), tf.constant(y), tf.constant(mask), tf.constant(lr))
    keras_step = make_sgd_step(build_keras_model(config, weights), float(lr))
    keras_args = tf_args[:3]
    impls = {
        "LiteRT, XNNPACK on": litert_step(OpResolverType.AUTO),
        "TF graph, TrainableLM.train": lambda: float(module.train(*tf_args)["loss"]),
        "TF graph, Keras SGD step": lambda: float(keras_step(*keras_args)),
    }
    if not args.skip_no_xnnpack:
        impls["LiteRT, XNNPACK off"] = litert_step(OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)

    # First call of each: the loss at the shared starting weights (and tracing/allocation).
    first = {name: step() for name, step in impls.items()}
    for name, loss in first.items():
        print(f"  first loss {name:30s} {loss:.6f}")
    spread = max(first.values()) - min(first.values())
    print(f"  max difference between implementations: {spread:.2e}")
    for step in impls.values():  # warm-up
        step()

    per_round = {name: [] for name in impls}
    for _ in range(args.rounds):
        for name, step in impls.items():
            n = max(1, args.steps // 5) if "off" in name else args.steps  # the slow one gets fewer steps
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            per_round[name].append((time.perf_counter() - t0) / n * 1e3)

    print(f"\nms per train step (median of {args.rounds} interleaved rounds; min in brackets):")
    ms = {name: statistics.median(times) for name, times in per_round.items()}
    for name, times in per_round.items():
        print(f"  {name:30s} {ms[name]:8.2f}  [{min(times):.2f}]")
    litert, tf_graph, keras = ms["LiteRT, XNNPACK on"], ms["TF graph, TrainableLM.train"], ms["TF graph, Keras SGD step"]
    print("\nratios:")
    print(f"  LiteRT / TF graph (same graph)   {litert / tf_graph:.2f}   (target <= 1.0)")
    print(f"  LiteRT / TF Keras SGD step       {litert / keras:.2f}")
    if "LiteRT, XNNPACK off" in ms:
        print(f"  LiteRT XNNPACK off / on          {ms['LiteRT, XNNPACK off'] / litert:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
