"""The on-disk form of prepared federated data, written by `fedkb data prepare`.

A prepared folder holds `tokenizer.model`, `stats.json`, and one `.npz` per split (`train`,
`test`, `heldout`), each a flat int32 token array plus per-client offsets: compact, loads
without pickle, and one client's stream is a slice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from fedkb_core.errors import FedkbError
from fedkb_core.durable import atomic_file, atomic_write_json, sha256_file

FORMAT_VERSION = 1
SPLITS = ("train", "test", "heldout")
TOKENIZER_FILE = "tokenizer.model"
STATS_FILE = "stats.json"


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Token streams per client for each split, plus the tokenizer that made them."""

    root: Path
    tokenizer_path: Path
    vocab_size: int
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    stats: dict

    @property
    def training_clients(self) -> list[str]:
        return list(self.train)


def write_split(path: Path, streams: dict[str, np.ndarray]) -> None:
    """Write one split atomically (tmp file + rename), so a crash leaves no half file."""
    ids = list(streams)
    lengths = np.array([len(streams[c]) for c in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([streams[c] for c in ids]).astype(np.int32) if ids else np.zeros(0, np.int32)
    with atomic_file(path) as f:
        np.savez(f, client_ids=np.array(ids, dtype=np.str_), offsets=offsets, tokens=tokens)


def read_split(path: Path, vocab_size: int) -> dict[str, np.ndarray]:
    """Read and validate one split file."""
    if not path.is_file():
        raise FedkbError(f"{path}: missing (is this a folder written by `fedkb data prepare`?)")
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, offsets, tokens = data["client_ids"], data["offsets"], data["tokens"]
    except (OSError, ValueError, KeyError) as err:
        raise FedkbError(f"{path}: not a valid split file ({err})") from None
    if offsets.ndim != 1 or len(offsets) != len(ids) + 1 or offsets[0] != 0 or offsets[-1] != len(tokens) \
            or np.any(np.diff(offsets) < 0):
        raise FedkbError(f"{path}: client offsets are inconsistent with the token array")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise FedkbError(f"{path}: token ids outside the tokenizer's vocabulary of {vocab_size}")
    return {str(c): tokens[offsets[i] : offsets[i + 1]] for i, c in enumerate(ids)}


def write_stats(root: Path, stats: dict) -> None:
    atomic_write_json(root / STATS_FILE, stats)


def load_prepared(data_dir: Path | str) -> PreparedData:
    """Load a prepared folder, checking that its parts belong together.

    Raises:
        FedkbError: missing files, a different format version, or a tokenizer that is not the
            one the token streams were made with.
    """
    from datasets.tokenizer import load_tokenizer

    root = Path(data_dir)
    if not root.is_dir():
        raise FedkbError(f"{root}: no such folder (run `fedkb data prepare --out {root}` first)")
    stats_path = root / STATS_FILE
    if not stats_path.is_file():
        raise FedkbError(f"{stats_path}: missing (run `fedkb data prepare --out {root}` first)")
    try:
        stats = json.loads(stats_path.read_text())
    except json.JSONDecodeError as err:
        raise FedkbError(f"{stats_path}: not valid JSON ({err})") from None
    if stats.get("format_version") != FORMAT_VERSION:
        raise FedkbError(f"{stats_path}: format version {stats.get('format_version')!r}, expected {FORMAT_VERSION}")
    tokenizer_path = root / TOKENIZER_FILE
    tokenizer = load_tokenizer(tokenizer_path)
    if sha256_file(tokenizer_path) != stats.get("tokenizer_sha256"):
        raise FedkbError(f"{tokenizer_path}: does not match the tokenizer recorded in {stats_path}")
    vocab_size = tokenizer.get_piece_size()
    splits = {name: read_split(root / f"{name}.npz", vocab_size) for name in SPLITS}
    return PreparedData(root=root, tokenizer_path=tokenizer_path, vocab_size=vocab_size, stats=stats, **splits)
