"""`fedkb data prepare`: corpus → splits → tokenizer → token streams → prepared folder."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datasets import prepared
from datasets.sources import load_dataset
from datasets.splits import SplitConfig, split_corpus
from datasets.tokenizer import encode_utterances, tokenizer_from_bytes, train_tokenizer
from fedkb_core.errors import FedkbError
from fedkb_core.durable import ensure_writable_folder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Everything `fedkb data prepare` decides."""

    dataset: str = "shakespeare"
    vocab_size: int = 8000  # Gboard-class keyboards use 5k–10k pieces
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    max_clients: int | None = None  # keep only the first N clients (by id) after filtering; for quick runs


def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    qs = {"min": 0, "p10": 10, "p25": 25, "p50": 50, "p75": 75, "p90": 90, "max": 100}
    return {k: float(np.percentile(values, q)) for k, q in qs.items()}


def prepare_dataset(config: PrepareConfig, out: Path, *, progress: bool | None = None) -> dict:
    """Write a prepared folder to `out` and return its stats.

    Raises:
        FedkbError: bad dataset spec or input, too few clients, unwritable output.
    """
    out = Path(out)
    ensure_writable_folder(out)
    started = time.monotonic()
    log.info("loading dataset %s", config.dataset)
    corpus = load_dataset(config.dataset)
    fsplit = split_corpus(corpus, config.split)
    if not fsplit.train:
        raise FedkbError(
            f"no client of {config.dataset} has at least {config.split.min_words} words "
            f"({len(corpus.clients)} clients read); lower --min-words"
        )
    if config.max_clients is not None:
        keep = sorted(fsplit.train)[: config.max_clients]
        fsplit = dataclasses.replace(
            fsplit,
            train={c: fsplit.train[c] for c in keep},
            test={c: fsplit.test[c] for c in keep},
            heldout=dict(sorted(fsplit.heldout.items())[: max(1, config.max_clients // 10)]),
        )
    log.info("%d training clients, %d held out, %d dropped (< %d words)",
             len(fsplit.train), len(fsplit.heldout), len(fsplit.dropped), config.split.min_words)

    # Tokenizer: trained on the training clients' training text only, so neither test text nor
    # held-out clients leak into the vocabulary.
    log.info("training a SentencePiece tokenizer (vocabulary %d)", config.vocab_size)
    training_text = [u for utterances in fsplit.train.values() for u in utterances]
    model_bytes = train_tokenizer(training_text, vocab_size=config.vocab_size)
    tokenizer = tokenizer_from_bytes(model_bytes)
    (out / prepared.TOKENIZER_FILE).write_bytes(model_bytes)

    streams = {}
    for name in prepared.SPLITS:
        clients = getattr(fsplit, name)
        streams[name] = {
            cid: encode_utterances(tokenizer, clients[cid])
            for cid in tqdm(clients, desc=f"tokenizing {name}", unit="client", disable=None if progress is None else not progress, leave=False)
        }
        prepared.write_split(out / f"{name}.npz", streams[name])

    words = {cid: sum(len(u.split()) for u in fsplit.train[cid] + fsplit.test[cid]) for cid in fsplit.train}
    words.update({cid: sum(len(u.split()) for u in fsplit.heldout[cid]) for cid in fsplit.heldout})
    split_words = {
        name: sum(len(u.split()) for utterances in getattr(fsplit, name).values() for u in utterances)
        for name in prepared.SPLITS
    }
    stats = {
        "format_version": prepared.FORMAT_VERSION,
        "dataset": config.dataset,
        "num_clients": len(words),
        "num_train_clients": len(fsplit.train),
        "num_heldout_clients": len(fsplit.heldout),
        "num_dropped_clients": len(fsplit.dropped),
        "num_words": int(sum(words.values())),
        "num_tokens": int(sum(len(s) for split in streams.values() for s in split.values())),
        "words_by_split": split_words,
        "tokens_by_split": {name: int(sum(len(s) for s in streams[name].values())) for name in prepared.SPLITS},
        "words_per_client": _quantiles(list(words.values())),
        "vocab_size": tokenizer.get_piece_size(),
        "vocab_size_requested": config.vocab_size,
        "tokenizer_sha256": prepared.sha256_file(out / prepared.TOKENIZER_FILE),
        "heldout_clients": sorted(fsplit.heldout),
        "split": dataclasses.asdict(config.split),
        "max_clients": config.max_clients,
        "load_report": corpus.report.as_dict(),
        "seconds": round(time.monotonic() - started, 2),
    }
    prepared.write_stats(out, stats)
    log.info("wrote %s: %d clients, %d words, %d tokens in %.1f s",
             out, stats["num_clients"], stats["num_words"], stats["num_tokens"], stats["seconds"])
    return stats
