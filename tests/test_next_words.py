"""The word beam search (fedkb_core/next_words.py) over a hand-built step function.

A fake model over a 9-piece vocabulary whose next-piece probabilities are a table keyed by the
pieces fed so far, so every expected word and score is computed by hand below.
"""

import math

import numpy as np
import pytest

from fedkb_core.next_words import WordCandidate, log_softmax, top_words

PAD, UNK, BOS, EOS, THE, CAT, S, DOG, CA = range(9)
PIECES = ["<pad>", "<unk>", "<s>", "</s>", "▁the", "▁cat", "s", "▁dog", "▁ca"]
WORD_START = np.array([p.startswith("▁") for p in PIECES])
WORD_START[EOS] = True  # EOS ends a word, as datasets.tokenizer.word_start_table marks it
V = len(PIECES)

# P(next piece | pieces fed after the context). Words, by hand:
#   the  = 0.40 · P(boundary after "the") 1.0          = 0.40
#   dog  = 0.20 · (▁the 0.5 + EOS 0.5)                 = 0.20  (EOS alone ends it half the time)
#   cats = 0.30 · P(s | cat) 0.6 · P(boundary) 1.0     = 0.18
#   cat  = 0.30 · (▁the 0.3 + EOS 0.1)                 = 0.12
#   EOS  = 0.10 as a next "word": never suggested
TABLE = {
    (): {THE: 0.4, CAT: 0.3, DOG: 0.2, EOS: 0.1},
    (THE,): {CAT: 0.5, DOG: 0.5},
    (CAT,): {S: 0.6, THE: 0.3, EOS: 0.1},
    (CAT, S): {THE: 1.0},
    (DOG,): {THE: 0.5, EOS: 0.5},
}
EXPECTED = [((THE,), 0.4), ((DOG,), 0.2), ((CAT, S), 0.18), ((CAT,), 0.12)]


def _logits(probs: dict[int, float], floor: float = -np.inf) -> np.ndarray:
    logits = np.full(V, floor)
    for piece, p in probs.items():
        logits[piece] = math.log(p)
    return logits.astype(np.float32)


class FakeModel:
    """step(token, state) where the state is the tuple of pieces fed after the context."""

    def __init__(self, table=TABLE, floor=-np.inf, strict=True):
        self.table, self.floor, self.strict, self.calls = table, floor, strict, []

    def __call__(self, token, state):
        self.calls.append((token, state))
        state = state + (token,)
        if self.strict:  # KeyError: the search fed a piece to the wrong state
            return _logits(self.table[state], self.floor), state
        return _logits(self.table.get(state, {p: 1.0 / V for p in range(V)}), self.floor), state


def _search(model=None, table=TABLE, **kwargs):
    model = model or FakeModel(table)
    return top_words(model, (), _logits(table[()], model.floor), WORD_START, **kwargs)


def test_log_softmax_normalizes_and_flattens():
    lp = log_softmax(np.array([[0.0, math.log(3.0)]], np.float32))
    np.testing.assert_allclose(lp, [math.log(0.25), math.log(0.75)], rtol=1e-6)


def test_words_scores_and_order_by_hand():
    words = _search(k=4)

    assert [w.pieces for w in words] == [pieces for pieces, _ in EXPECTED]
    for word, (_, p) in zip(words, EXPECTED, strict=True):
        assert word.log_prob == pytest.approx(math.log(p), abs=1e-6)
        assert isinstance(word, WordCandidate)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10])
def test_k_limits_the_number_of_words(k):
    words = _search(k=k)

    assert [w.pieces for w in words] == [pieces for pieces, _ in EXPECTED][:k]


def test_eos_is_never_suggested_even_when_most_likely():
    table = dict(TABLE)
    table[()] = {EOS: 0.9, DOG: 0.1}

    words = _search(table=table, k=3)

    assert [w.pieces for w in words] == [(DOG,)]
    assert words[0].log_prob == pytest.approx(math.log(0.1), abs=1e-6)


def test_continuation_and_special_pieces_never_start_a_word():
    # "s" is a continuation piece; pad/unk/bos are not word starts: none may begin a suggestion.
    table = {(): {S: 0.5, PAD: 0.1, UNK: 0.1, BOS: 0.1, CAT: 0.2}, (CAT,): {S: 0.6, EOS: 0.4}, (CAT, S): {EOS: 1.0}}

    words = _search(table=table, k=5)

    assert [w.pieces for w in words] == [(CAT, S), (CAT,)]
    assert [w.log_prob for w in words] == pytest.approx([math.log(0.12), math.log(0.08)])


def test_a_word_ends_only_at_a_boundary():
    # "▁ca" alone ends only if a word start or EOS follows it (0.2); "▁ca"+"s" ends before "▁dog".
    table = {(): {CA: 1.0}, (CA,): {S: 0.8, EOS: 0.2}, (CA, S): {DOG: 1.0}}

    words = _search(table=table, k=3)

    assert [w.pieces for w in words] == [(CA, S), (CA,)]
    assert [w.log_prob for w in words] == pytest.approx([math.log(0.8), math.log(0.2)])


@pytest.mark.parametrize("max_pieces, expected", [
    (1, [(THE,), (DOG,), (CAT,)]),  # "cats" needs two pieces
    (2, [(THE,), (DOG,), (CAT, S)]),
])
def test_max_pieces_bounds_word_length(max_pieces, expected):
    assert [w.pieces for w in _search(k=3, max_pieces=max_pieces)] == expected


def test_beam_limits_the_words_explored():
    # A beam of one follows only the most likely first piece.
    assert [w.pieces for w in _search(k=3, beam=1)] == [(THE,)]


def test_states_are_threaded_through_and_steps_are_bounded():
    model = FakeModel()

    _search(model, k=3, beam=4, max_pieces=4)

    # One step per partial word: the, cat, dog at depth 1, then "cat"+"s" at depth 2. Each step got
    # the state that produced its piece's logits (the fake model would KeyError otherwise).
    assert sorted(model.calls) == sorted([(THE, ()), (CAT, ()), (DOG, ()), (S, (CAT,))])


def test_finite_floor_logits_give_the_same_ranking():
    # Real models never give -inf: with every unlisted piece at a tiny probability (and a uniform
    # next piece after words the table does not know) the order and the scores hold.
    model = FakeModel(floor=-30.0, strict=False)

    words = top_words(model, (), _logits(TABLE[()], -30.0), WORD_START, k=4, max_pieces=2)

    assert [w.pieces for w in words] == [pieces for pieces, _ in EXPECTED]
    assert [w.log_prob for w in words] == pytest.approx([math.log(p) for _, p in EXPECTED], abs=1e-6)


def test_ties_go_to_the_lower_piece_id():
    # "▁dog" and "▁cat" equally likely: the order is fixed (lower id first), not the sort's whim.
    table = {(): {DOG: 0.5, CAT: 0.5}, (CAT,): {EOS: 1.0}, (DOG,): {EOS: 1.0}}

    assert [w.pieces for w in _search(table=table, k=2)] == [(CAT,), (DOG,)]
    assert [w.pieces for w in _search(table=table, k=1, beam=1)] == [(CAT,)]


def test_a_boundary_far_below_the_peak_still_scores_finitely():
    # After "▁ca" a continuation dominates by 800 nats, beyond where exp() of the gap underflows:
    # the word "ca" must keep its exact (tiny) score, not -inf.
    start = _logits({CA: 1.0})
    after_ca = np.full(V, -np.inf, np.float32)
    after_ca[S], after_ca[EOS] = 0.0, -800.0

    def step(token, state):
        return (after_ca if state == () else _logits({EOS: 1.0})), state + (token,)

    words = top_words(step, (), start, WORD_START, k=2, max_pieces=2)

    assert [w.pieces for w in words] == [(CA, S), (CA,)]
    assert words[1].log_prob == pytest.approx(-800.0, abs=1e-6)
