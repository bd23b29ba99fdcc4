"""The SentencePiece tokenizer shared by training, the server and the device.

The same `.model` file ships with every model version, so the ids below are a contract: padding
is 0 (masked out of every loss), then unknown, begin and end of utterance.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from fedkb_core.errors import FedkbError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WORD_BOUNDARY = "\u2581"  # SentencePiece's marker at the start of a piece that begins a word


def train_tokenizer(sentences: Iterable[str], *, vocab_size: int = 8000, seed_text_limit: int = 2_000_000,
                    num_threads: int = 2) -> bytes:
    """Train a unigram SentencePiece model and return the serialized `.model` bytes.

    The vocabulary is a soft limit (`hard_vocab_limit=False`): a small user corpus gets a smaller
    vocabulary rather than an error, so read the real size with `vocab_size(...)`.
    """
    if vocab_size < 8:
        raise FedkbError(f"vocabulary size must be at least 8, got {vocab_size}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        input_sentence_size=seed_text_limit,
        shuffle_input_sentence=False,  # deterministic: same corpus, same tokenizer
        num_threads=num_threads,
        minloglevel=2,
    )
    return model.getvalue()


def load_tokenizer(path: Path | str) -> spm.SentencePieceProcessor:
    """Load a `.model` file, with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FedkbError(f"{path}: tokenizer model not found")
    return tokenizer_from_bytes(path.read_bytes(), where=str(path))


def tokenizer_from_bytes(data: bytes, *, where: str = "tokenizer") -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError with C++ text
        raise FedkbError(f"{where}: not a SentencePiece model ({err})") from None
    if processor.pad_id() != PAD_ID or processor.bos_id() != BOS_ID or processor.eos_id() != EOS_ID:
        raise FedkbError(f"{where}: tokenizer ids differ from fedkb's (pad=0, unk=1, bos=2, eos=3)")
    return processor


def encode_utterances(processor: spm.SentencePieceProcessor, utterances: Iterable[str]) -> np.ndarray:
    """One int32 token stream: BOS, pieces, EOS for each utterance, concatenated."""
    pieces = processor.encode(list(utterances), out_type=int)
    total = sum(len(p) + 2 for p in pieces)
    stream = np.empty(total, dtype=np.int32)
    at = 0
    for ids in pieces:
        stream[at] = BOS_ID
        stream[at + 1 : at + 1 + len(ids)] = ids
        stream[at + 1 + len(ids)] = EOS_ID
        at += len(ids) + 2
    return stream


def word_start_table(processor: spm.SentencePieceProcessor) -> np.ndarray:
    """bool[vocab]: True for pieces that begin a new word (and for EOS, which ends one)."""
    table = np.array([processor.id_to_piece(i).startswith(WORD_BOUNDARY) for i in range(processor.get_piece_size())])
    table[EOS_ID] = True
    table[[PAD_ID, UNK_ID, BOS_ID]] = False
    return table
