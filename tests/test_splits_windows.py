"""Per-client splits and [B, T] windows: small cases checked by hand."""

import numpy as np
import pytest

from datasets.corpus import Corpus, LoadReport, build_corpus
from datasets.splits import SplitConfig, split_by_position, split_corpus
from datasets.tokenizer import BOS_ID, EOS_ID
from datasets.windows import iterate_batches, make_windows


@pytest.mark.parametrize(
    "n, expected_test",
    [(1, 0), (2, 1), (5, 1), (10, 2), (11, 2), (13, 3)],
)
def test_split_by_position_keeps_the_last_fifth_for_testing(n, expected_test):
    utterances = tuple(f"u{i}" for i in range(n))
    train, test = split_by_position(utterances, 0.2)
    assert len(test) == expected_test
    assert train + test == utterances  # order kept: test text comes after training text


def _corpus(words_per_client: list[int]) -> Corpus:
    return build_corpus(
        "t", {f"c{i:02d}": ["w " * n] for i, n in enumerate(words_per_client)}, LoadReport("t")
    )


def test_split_corpus_filters_small_clients_and_holds_out_deterministically():
    corpus = _corpus([10, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 5])
    config = SplitConfig(min_words=64, heldout_fraction=0.2, seed=3)
    a, b = split_corpus(corpus, config), split_corpus(corpus, config)
    assert a.dropped == ("c00", "c11")
    assert len(a.heldout) == 2 and a.heldout == b.heldout
    assert set(a.train).isdisjoint(a.heldout)
    assert len(a.train) + len(a.heldout) == 10


@pytest.mark.parametrize("bad", [dict(min_words=0), dict(test_fraction=1.0), dict(heldout_fraction=-0.1)])
def test_split_config_rejects_impossible_values(bad):
    with pytest.raises(ValueError):
        SplitConfig(**bad)


def test_make_windows_shifts_targets_pads_and_masks_bos():
    # BOS 10 11 EOS BOS 12 EOS  -> 6 targets, T=4 -> 2 windows
    tokens = np.array([BOS_ID, 10, 11, EOS_ID, BOS_ID, 12, EOS_ID], np.int32)
    w = make_windows(tokens, 4)
    np.testing.assert_array_equal(w.x, [[BOS_ID, 10, 11, EOS_ID], [BOS_ID, 12, EOS_ID, 0]])
    np.testing.assert_array_equal(w.y, [[10, 11, EOS_ID, BOS_ID], [12, EOS_ID, 0, 0]])
    np.testing.assert_array_equal(w.mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert w.num_tokens == 5
    assert len(make_windows(np.array([BOS_ID], np.int32), 4)) == 0


def test_iterate_batches_is_exact_size_and_seeded():
    tokens = np.arange(4, 4 + 50, dtype=np.int32)
    w = make_windows(tokens, 5)  # 49 targets -> 10 windows
    batches = list(iterate_batches(w, batch_size=4, seed=7, epochs=2))
    assert len(batches) == 6
    assert all(b.x.shape == (4, 5) and b.mask.shape == (4, 5) for b in batches)
    assert sum(b.num_tokens for b in batches) == 2 * 49
    again = list(iterate_batches(w, batch_size=4, seed=7, epochs=2))
    assert all(np.array_equal(p.x, q.x) for p, q in zip(batches, again, strict=True))
    other = list(iterate_batches(w, batch_size=4, seed=8, epochs=2))
    assert not all(np.array_equal(p.x, q.x) for p, q in zip(batches, other, strict=True))
