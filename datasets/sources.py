"""Turn a `--dataset` spec (shakespeare, jsonl:PATH, csv:PATH, dir:PATH) into a Corpus."""

from __future__ import annotations

from pathlib import Path

from datasets.corpus import Corpus
from fedkb_core.errors import FedkbError

DATASET_HELP = "shakespeare (built in), jsonl:PATH, csv:PATH or dir:PATH"


def load_dataset(spec: str) -> Corpus:
    """Load the corpus a `--dataset` value names.

    Raises:
        FedkbError: unknown kind, missing path, or malformed input (naming file and line).
    """
    kind, _, path = spec.partition(":")
    if kind == "shakespeare" and not path:
        from datasets.shakespeare import load_shakespeare

        return load_shakespeare()
    if kind in ("jsonl", "csv", "dir"):
        if not path:
            raise FedkbError(f"--dataset {kind}: needs a path, as in {kind}:PATH")
        from datasets import user_text

        loader = {"jsonl": user_text.load_jsonl, "csv": user_text.load_csv, "dir": user_text.load_folder}[kind]
        return loader(Path(path).expanduser())
    raise FedkbError(f"unknown dataset {spec!r}; expected {DATASET_HELP}")
