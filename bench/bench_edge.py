"""Edge runtime benchmark: on-device training throughput, peak memory, upload bytes per update.

At the default model size (model.config.ModelConfig: V=8000, E=96, H=256, B=16, T=20, ~1.15M
parameters), exported with export.pipeline.export_model into a temporary folder (~30 s), on the
token stream of Shakespeare-by-role clients (`fedkb data prepare --dataset shakespeare`), it runs
one device's training job exactly as `fedkb device` does (edge_runtime.trainer.TrainingJob under
the scheduler: set the global weights, `train` step by step, read the weights, Δ, clip) in a
fresh child process that imports only the edge runtime (no TensorFlow), and prints:
    - examples/s (windows of T tokens; what FedAvg weighs an update by), tokens/s and ms per step,
      for each interpreter thread count;
    - the child's peak RSS (getrusage ru_maxrss, the high-water mark; /proc VmHWM as a cross-check)
      and its RSS after imports, before the model loads, so the job's own share is visible;
    - upload bytes of the update in every `fedkb_core.wire` encoding, the ratio to float32 and the
      relative L2 error the encoding adds to Δ.

Usage:
    python bench/bench_edge.py                       # default size, 1 and 2 threads
    python bench/bench_edge.py --quick               # tiny model on generated sentences (seconds)
    python bench/bench_edge.py --model runs/model --data runs/data   # reuse an export and a prepared folder
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

QUICK_MODEL = dict(embed_dim=16, lstm_units=32, batch_size=8, seq_len=10)
_WORDS = ("the a my your this that one every good old new little great time day night love heart word "
          "see know think come go make take give find tell ask is was will can would should must "
          "and but or so if when then here there now today tomorrow home friend house letter king queen "
          "i you we they he she it to of in on at with for from by about").split()


# Data and model (parent process; may use TensorFlow to export) ----------------------------

def generated_sentences(count: int, seed: int = 0) -> list[str]:
    """Keyboard-length messages of common words, seeded (for --quick and as a fallback)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(4, 14)))) for _ in range(count)]


def quick_inputs(tmp: Path) -> tuple[Path, np.ndarray]:
    """A tiny model and a token stream from generated sentences."""
    from datasets.tokenizer import encode_utterances, load_tokenizer, train_tokenizer
    from export.pipeline import export_model
    from model.config import ModelConfig

    sentences = generated_sentences(3000)
    (tmp / "tokenizer.model").write_bytes(train_tokenizer(sentences, vocab_size=200))
    tokenizer = load_tokenizer(tmp / "tokenizer.model")
    config = ModelConfig(vocab_size=tokenizer.get_piece_size(), **QUICK_MODEL)
    export_model(tokenizer_path=tmp / "tokenizer.model", out_dir=tmp / "model", config=config)
    return tmp / "model", encode_utterances(tokenizer, sentences)


def default_inputs(tmp: Path, model: Path | None, data: Path | None) -> tuple[Path, np.ndarray, dict]:
    """The default-size model and the training tokens of a prepared dataset (prepared if not given)."""
    from datasets.prepare import PrepareConfig, prepare_dataset
    from datasets.prepared import load_prepared
    from export.pipeline import export_model
    from model.config import ModelConfig

    timings = {}
    if data is None:
        start = time.perf_counter()
        data = tmp / "data"
        prepare_dataset(PrepareConfig(dataset="shakespeare"), data, progress=False)
        timings["prepare_s"] = time.perf_counter() - start
    prepared = load_prepared(data)
    if model is None:
        start = time.perf_counter()
        model = tmp / "model"
        export_model(tokenizer_path=prepared.tokenizer_path, out_dir=model,
                     config=ModelConfig(vocab_size=prepared.vocab_size))
        timings["export_s"] = time.perf_counter() - start
    # One heavy typist: the training clients with the most text, until there is enough of it.
    streams = sorted(prepared.train.values(), key=len, reverse=True)
    return model, np.concatenate(streams[:40]), timings


# The child: only the edge runtime, only the job ---------------------------------------------

def child_main(model_dir: Path, tokens_path: Path, threads: int, max_examples: int, epochs: int) -> dict:
    """Run one training job as the device does and report time, memory and upload sizes."""
    import resource

    from datasets.windows import make_windows
    from edge_runtime.device_state import ScriptedDeviceState
    from edge_runtime.eligibility import EligibilityPolicy
    from edge_runtime.litert_model import TrainableModel
    from edge_runtime.scheduler import COMPLETED, CheckpointStore, Scheduler
    from edge_runtime.trainer import TrainingJob
    from fedkb_core.clipping import global_norm
    from fedkb_core.protocol import DeviceState, RoundTask
    from fedkb_core.wire import UpdateMetadata, decode_update, encode_update

    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    assert not heavy, f"the device child imported {heavy[:3]}"
    rss_imports_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    start = time.perf_counter()
    model = TrainableModel(model_dir, num_threads=threads)
    global_weights = model.get_weights()
    load_s = time.perf_counter() - start
    windows = make_windows(np.load(tokens_path), model.seq_len)
    task = RoundTask(round_id=1, model_version=1, learning_rate=0.5, epochs=epochs, batch_size=model.batch_size,
                     max_examples=max_examples, clip_norm=1.0, deadline=time.time() + 86400)
    ready = DeviceState(idle=True, charging=True, unmetered=True, battery=90.0)
    with tempfile.TemporaryDirectory() as tmp:
        scheduler = Scheduler(state=ScriptedDeviceState(ready), policy=EligibilityPolicy(),
                              checkpoints=CheckpointStore(Path(tmp) / "job.safetensors"))
        start = time.perf_counter()
        job = TrainingJob(model, global_weights, windows, task, seed=0)
        step_times = []
        run_step = job.run_step

        def timed_step(step: int) -> float:  # per-step times, for the steady-state median
            t0 = time.perf_counter()
            loss = run_step(step)
            step_times.append(time.perf_counter() - t0)
            return loss

        job.run_step = timed_step
        outcome = scheduler.run(job)
        assert outcome.status == COMPLETED, outcome
        update = job.result(outcome.losses)
        job_s = time.perf_counter() - start
    rss_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm_mb = _vm_hwm_mb()  # this process image's own peak: a cross-check that nothing was inherited

    encodings = {}
    reference = global_norm(update.deltas)
    # bench/bench_compression.py measures the hadamard encoding at every b; 8 bits here as the reference.
    for encoding, bits, seed in (("float32", None, None), ("float16", None, None), ("hadamard", 8, 1)):
        meta = UpdateMetadata(round_id=1, model_version=1, device_id="bench", num_examples=update.num_examples,
                              clip_norm=update.clip_norm, update_norm=update.update_norm, encoding=encoding,
                              update_bits=bits, rotation_seed=seed)
        body = encode_update(update.deltas, meta)
        decoded = decode_update(body, list(model.manifest.weights)).deltas
        error = global_norm({k: decoded[k] - update.deltas[k] for k in decoded}) / reference
        encodings[encoding if bits is None else f"{encoding}{bits}"] = {"bytes": len(body), "relative_l2_error": error}
    return {
        "threads": threads, "num_parameters": sum(s.size for s in model.manifest.weights),
        "batch_size": model.batch_size, "seq_len": model.seq_len, "examples": update.num_examples,
        "epochs": epochs, "steps": update.steps, "tokens": int(job.windows.num_tokens) * epochs,
        "load_s": load_s, "job_s": job_s, "examples_per_s": update.num_examples * epochs / job_s,
        "tokens_per_s": int(job.windows.num_tokens) * epochs / job_s,
        "ms_per_step_median": 1000 * float(np.median(step_times)), "first_step_ms": 1000 * step_times[0],
        "mean_loss": update.mean_loss, "update_norm": update.update_norm,
        "rss_after_imports_mb": rss_imports_mb, "rss_peak_mb": rss_peak_mb, "vm_hwm_mb": hwm_mb,
        "encodings": encodings,
    }


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _python(*args: str) -> str:
    """Run this script in a child Python and return its last stdout line (its JSON answer)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=REPO, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {args[:1]} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def run_child(model: Path, tokens: Path, *, threads: int, max_examples: int, epochs: int) -> dict:
    return json.loads(_python("--child", str(model), str(tokens), "--threads", str(threads), "--max-examples",
                              str(max_examples), "--epochs", str(epochs)))


def setup_main(tmp: Path, quick: bool, model: Path | None, data: Path | None) -> dict:
    """Export the model and write the token stream (a child of its own: it loads TensorFlow)."""
    if quick:
        model, tokens = quick_inputs(tmp)
        timings = {}
    else:
        model, tokens, timings = default_inputs(tmp, model, data)
    np.save(tmp / "tokens.npy", tokens.astype(np.int32))
    return {"model": str(model), "tokens": str(tmp / "tokens.npy"), "timings": timings}


# Report -----------------------------------------------------------------------------------

def print_table(results: list[dict]) -> None:
    first = results[0]
    print(f"model: {first['num_parameters']:,} parameters, B={first['batch_size']} T={first['seq_len']}; job: "
          f"{first['examples']} examples x {first['epochs']} epoch(s) = {first['steps']} steps; "
          f"{os.cpu_count()} CPUs visible")
    print(f"{'threads':>7} {'examples/s':>10} {'tokens/s':>9} {'ms/step':>8} {'1st step':>8} {'job s':>6} "
          f"{'load s':>6} {'RSS peak MB':>11} {'after imports':>13} {'VmHWM':>6}")
    for r in results:
        print(f"{r['threads']:>7} {r['examples_per_s']:>10.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['ms_per_step_median']:>8.2f} {r['first_step_ms']:>8.2f} {r['job_s']:>6.2f} {r['load_s']:>6.2f} "
              f"{r['rss_peak_mb']:>11.0f} {r['rss_after_imports_mb']:>13.0f} {r['vm_hwm_mb'] or float('nan'):>6.0f}")
    print(f"\nupload per update ({first['examples']} examples, update norm {first['update_norm']:.3f} before "
          "clipping to 1.0):")
    print(f"{'encoding':>8} {'bytes':>10} {'vs float32':>10} {'rel. L2 error':>13}")
    base = first["encodings"]["float32"]["bytes"]
    for name, e in first["encodings"].items():
        print(f"{name:>8} {e['bytes']:>10,} {e['bytes'] / base:>10.3f} {e['relative_l2_error']:>13.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model on generated sentences (seconds)")
    parser.add_argument("--model", type=Path, default=None, help="an exported model folder to use instead of exporting")
    parser.add_argument("--data", type=Path, default=None, help="a prepared data folder to take the text from")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="interpreter thread counts to run")
    parser.add_argument("--max-examples", type=int, default=1000, help="the task's max examples (server default 1000)")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs (server default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--setup", type=Path, metavar="TMP", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.setup:
        print(json.dumps(setup_main(args.setup, args.quick, args.model, args.data)))
        return 0
    if args.child:
        print(json.dumps(child_main(Path(args.child[0]), Path(args.child[1]), args.threads[0], args.max_examples,
                                    args.epochs)))
        return 0

    # This parent stays small (no TensorFlow): Linux carries a process's RSS high-water mark
    # across fork and exec, so a child spawned from a parent holding TensorFlow would report the
    # parent's peak as its own. Exporting runs in a child of its own for that reason.
    with tempfile.TemporaryDirectory(prefix="fedkb-bench-edge-") as tmp_name:
        start = time.perf_counter()
        setup_args = ["--setup", tmp_name] + (["--quick"] if args.quick else [])
        setup_args += ["--model", str(args.model)] if args.model else []
        setup_args += ["--data", str(args.data)] if args.data else []
        setup = json.loads(_python(*setup_args))
        max_examples = min(args.max_examples, 256) if args.quick else args.max_examples
        steps = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in setup["timings"].items())
        print(f"setup {time.perf_counter() - start:.1f} s{f' ({steps})' if steps else ''}")
        results = [run_child(Path(setup["model"]), Path(setup["tokens"]), threads=t, max_examples=max_examples,
                             epochs=args.epochs) for t in args.threads]
        print_table(results)
        if args.json:
            args.json.write_text(json.dumps({"timings": setup["timings"], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
