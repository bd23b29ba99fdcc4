"""The SentencePiece tokenizer: real training, the id contract, and corrupt files."""

import numpy as np
import pytest

from datasets.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, encode_utterances, load_tokenizer,
                                tokenizer_from_bytes, train_tokenizer, word_start_table)
from fedkb_core.errors import FedkbError
from tests.conftest import SAMPLE_LINES


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_from_bytes(train_tokenizer(SAMPLE_LINES * 20, vocab_size=60))


def test_reserved_ids_and_round_trip(tokenizer):
    assert (tokenizer.pad_id(), tokenizer.unk_id(), tokenizer.bos_id(), tokenizer.eos_id()) == (
        PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert tokenizer.decode(tokenizer.encode("to be or not to be")) == "to be or not to be"


def test_training_is_deterministic():
    assert train_tokenizer(SAMPLE_LINES * 20, vocab_size=60) == train_tokenizer(SAMPLE_LINES * 20, vocab_size=60)


def test_encode_utterances_frames_each_with_bos_and_eos(tokenizer):
    stream = encode_utterances(tokenizer, ["to be", "the question"])
    assert stream.dtype == np.int32
    assert stream[0] == BOS_ID and stream[-1] == EOS_ID
    assert list(stream).count(BOS_ID) == 2 and list(stream).count(EOS_ID) == 2
    first = tokenizer.encode("to be")
    assert list(stream[1 : 1 + len(first)]) == first


def test_word_start_table_marks_word_initial_pieces(tokenizer):
    table = word_start_table(tokenizer)
    ids = tokenizer.encode("question")
    assert table[ids[0]] and not any(table[i] for i in ids[1:])
    assert table[EOS_ID] and not table[PAD_ID] and not table[BOS_ID]


def test_corrupt_or_missing_model_file(tmp_path):
    with pytest.raises(FedkbError, match="tokenizer model not found"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(FedkbError, match="not a SentencePiece model"):
        load_tokenizer(bad)
