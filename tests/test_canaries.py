"""The memorization audit's parts: exposure over hand-built scorers whose ranks are known, the
model's scorer against a plain forward pass, planting into the training text only, and the
canaries' settings."""

from __future__ import annotations

import dataclasses
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from datasets.prepared import load_prepared
from datasets.tokenizer import BOS_ID, EOS_ID, load_tokenizer, tokenizer_from_bytes, train_tokenizer
from fedkb_core.errors import FedkbError
from model import numpy_lm
from model.config import ModelConfig
from model.metrics import token_nll
from model.weights import initial_weights
from datasets.windows import make_windows
from edge_runtime.trainer import sample_window_indices, select_windows
from fedkb_core.protocol import RoundTask
from simulation.canaries import (DIGITS, NUMBER_WORDS, CanaryConfig, canary_utterance, canary_windows, draw_canaries,
                                 exposure_by_repeats, model_scorer, plant, plant_canaries, resolve_alphabet,
                                 suggested_words, summary_line)
from simulation.exposure import measure_exposures
from tests.fixtures_model import tiny_data  # noqa: F401  (the session fixture)


def _value(secrets: np.ndarray, alphabet_size: int) -> np.ndarray:
    """The secret read as a base-A number: a scorer whose order is known."""
    length = secrets.shape[1]
    return (secrets * alphabet_size ** np.arange(length - 1, -1, -1)).sum(axis=1)


def test_exact_rank_counts_the_candidates_the_model_prefers_and_leaves_out_the_other_secrets():
    calls = []

    def score(secrets):
        calls.append(secrets.copy())
        return _value(secrets, 10).astype(float)

    secrets = [(0, 0, 5), (0, 1, 0), (9, 9, 9)]  # values 5, 10 and 999, the least likely of all
    results = measure_exposures(secrets, alphabet_size=10, length=3, score=score, max_candidates=1000)
    # One call with every candidate, in itertools.product order.
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0], np.array(list(itertools.product(range(10), repeat=3))))
    candidates = 1000 - 3 + 1
    assert [r.candidates for r in results] == [candidates] * 3
    assert [r.method for r in results] == ["exact"] * 3
    # 0..4 beat 5; 0..9 but the planted 5 beat 10; everything unplanted beats 999.
    assert [r.rank for r in results] == [6, 10, candidates]
    assert results[0].exposure == pytest.approx(math.log2(candidates) - math.log2(6))
    assert results[2].exposure == pytest.approx(0.0)
    assert [r.log_perplexity for r in results] == [5, 10, 999]


def test_a_secret_the_model_prefers_to_everything_has_the_full_exposure_and_ties_count_for_it():
    best = measure_exposures([(0, 0)], alphabet_size=8, length=2, score=lambda s: _value(s, 8).astype(float),
                             max_candidates=100)[0]
    assert best.rank == 1 and best.exposure == pytest.approx(math.log2(64))
    tied = measure_exposures([(3, 3)], alphabet_size=8, length=2, score=lambda s: np.zeros(len(s)),
                             max_candidates=100)[0]
    assert tied.rank == 1 and tied.exposure == pytest.approx(math.log2(64))


def test_a_sample_of_candidates_estimates_the_rank_in_a_space_too_large_to_score():
    secret = (2, 5, 0, 0, 0, 0)  # value 250000 of 10^6: its true rank is 250001
    result = measure_exposures([secret], alphabet_size=10, length=6, score=lambda s: _value(s, 10).astype(float),
                               max_candidates=20_000, seed=3)[0]
    assert result.method == "sampled" and result.candidates == 10**6
    assert result.scored == 20_000 + 1  # the sample and the secret itself
    assert result.rank == pytest.approx(250_001, rel=0.05)
    assert result.exposure == pytest.approx(math.log2(10**6) - math.log2(250_001), abs=0.08)


def test_beyond_the_sample_the_rank_is_extrapolated_from_a_skew_normal_fit_as_in_the_paper():
    from scipy import stats

    space = 10**8

    def score(secrets):  # log-perplexities normally distributed over the space, in the secrets' order
        return stats.norm.ppf((_value(secrets, 10) + 0.5) / space)

    for value in (3, 1000):  # true ranks 4 and 1001: no sampled candidate beats either
        secret = tuple(int(d) for d in f"{value:08d}")
        result = measure_exposures([secret], alphabet_size=10, length=8, score=score, max_candidates=20_000,
                                   seed=0)[0]
        assert result.method == "extrapolated"
        assert result.exposure == pytest.approx(math.log2(space) - math.log2(value + 1), abs=1.0)


def test_planted_secrets_must_be_distinct_and_in_the_alphabet():
    with pytest.raises(ValueError, match="distinct"):
        measure_exposures([(1, 2), (1, 2)], alphabet_size=4, length=2, score=lambda s: np.zeros(len(s)),
                          max_candidates=100)
    with pytest.raises(ValueError, match="alphabet indices"):
        measure_exposures([(1, 4)], alphabet_size=4, length=2, score=lambda s: np.zeros(len(s)), max_candidates=100)


def test_the_model_scorer_is_the_log_perplexity_of_secret_and_end_after_the_prefix():
    rng = np.random.default_rng(0)
    weights = {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
               for k, v in initial_weights(ModelConfig(vocab_size=30, embed_dim=8, lstm_units=16)).items()}
    context = [BOS_ID, 11, 12, 13]
    words = [[5], [6, 7], [8, 9, 10]]  # words of different lengths: padded batches
    secrets = np.array([[0, 0, 0], [2, 1, 0], [1, 2, 2], [2, 2, 2]])
    got = model_scorer(weights, context, words, batch=3)(secrets)  # two batches
    for secret, bits in zip(secrets, got, strict=True):
        tokens = context + [p for s in secret for p in words[s]] + [EOS_ID]
        logits, _, _ = numpy_lm.forward(weights, np.array([tokens[:-1]]))
        nll = token_nll(logits[0], np.array(tokens[1:]))
        assert bits == pytest.approx(nll[len(context) - 1:].sum() / math.log(2), rel=1e-5)


def test_canaries_are_planted_whole_between_utterances_of_their_devices_training_text_only(tiny_data):
    data = load_prepared(tiny_data)
    devices = sorted(data.train)[:6]
    config = CanaryConfig(count=3, repeats=(1, 4), alphabet=tuple("0123"), length=3, seed=5)
    planted, audit = plant_canaries(data, config, devices)
    canaries = audit.canaries
    assert len({c.device for c in canaries}) == 3 and {c.device for c in canaries} <= set(devices)
    assert [c.repeats for c in canaries] == [1, 4, 1]
    assert planted.test is data.test and planted.heldout is data.heldout  # never a held-out or test split
    tokenizer = load_tokenizer(data.tokenizer_path)
    for client, stream in planted.train.items():
        mine = [c for c in canaries if c.device == client]
        if not mine:
            assert stream is data.train[client]
            continue
        utterance = canary_utterance(tokenizer, mine[0]).tolist()
        assert utterance == [BOS_ID, *tokenizer.encode(mine[0].phrase), EOS_ID]
        found, rest, i, tokens = 0, [], 0, stream.tolist()
        while i < len(tokens):
            if tokens[i : i + len(utterance)] == utterance:
                found += 1
                i += len(utterance)
                assert i == len(tokens) or tokens[i] == BOS_ID  # ends where an utterance starts
            else:
                rest.append(tokens[i])
                i += 1
        assert found == mine[0].repeats
        assert rest == data.train[client].tolist()  # the device's own text, unchanged around it


def test_canaries_are_drawn_with_their_seed_on_distinct_devices_with_distinct_secrets():
    devices = [f"d{i}" for i in range(10)]
    config = CanaryConfig(count=6, repeats=(1, 4, 16), length=2, seed=1)
    first = draw_canaries(config, DIGITS, devices)
    assert first == draw_canaries(config, DIGITS, devices)
    assert first != draw_canaries(CanaryConfig(count=6, repeats=(1, 4, 16), length=2, seed=2), DIGITS, devices)
    assert len({c.device for c in first}) == 6 and len({c.secret for c in first}) == 6
    assert [c.repeats for c in first] == [1, 4, 16, 1, 4, 16]
    for canary in first:
        assert canary.phrase == "my pin is " + " ".join(DIGITS[i] for i in canary.secret)
    with pytest.raises(FedkbError, match="--canaries 6 needs as many emulated devices; --clients is 5"):
        draw_canaries(config, DIGITS, devices[:5])


def _tokenizer(lines):
    return tokenizer_from_bytes(train_tokenizer(lines * 20, vocab_size=80))


def test_the_default_alphabet_is_digits_or_else_number_words_the_tokenizer_knows():
    words = " ".join(NUMBER_WORDS)
    with_digits = _tokenizer([f"my pin is {' '.join(DIGITS)}", words, "to be or not to be"])
    without_digits = _tokenizer([words, "my pin is what", "to be or not to be"])
    assert resolve_alphabet(CanaryConfig(), with_digits) == DIGITS
    assert resolve_alphabet(CanaryConfig(), without_digits) == NUMBER_WORDS
    with pytest.raises(FedkbError, match=r"encodes digits \(0, 1, .*\) and number words \(zero, .*\) as <unk>"):
        resolve_alphabet(CanaryConfig(), _tokenizer(["to be or not to be that is the question"]))
    with pytest.raises(FedkbError, match=r"--canary-alphabet: the tokenizer encodes 7 as <unk>"):
        resolve_alphabet(CanaryConfig(alphabet=("one", "7")), without_digits)


@pytest.mark.parametrize("config, message", [
    (CanaryConfig(count=-1), "--canaries must not be negative"),
    (CanaryConfig(count=1, repeats=()), "--canary-repeats must be one or more counts"),
    (CanaryConfig(count=1, repeats=(1, 0)), "--canary-repeats must be one or more counts of at least 1, got [1, 0]"),
    (CanaryConfig(count=1, prefix="  "), "--canary-prefix must have at least one word"),
    (CanaryConfig(count=1, length=0), "--canary-length must be at least 1"),
    (CanaryConfig(count=1, alphabet=("a", "a")), "--canary-alphabet needs at least two distinct words"),
    (CanaryConfig(count=1, alphabet=("a b", "c")), "one word without spaces"),
    (CanaryConfig(count=1, max_candidates=10), "--canary-candidates must be at least 100"),
    (CanaryConfig(count=1, length=20), "more than 2^62 candidates"),
    (CanaryConfig(count=60, length=2), "--canaries 60 is too many for 10^2 candidates"),
])
def test_settings_out_of_range_are_named(config, message):
    assert any(message in p for p in config.problems()), config.problems()


def test_an_unencodable_prefix_is_refused_before_anything_is_planted(tiny_data):
    data = load_prepared(tiny_data)
    with pytest.raises(FedkbError, match="--canary-prefix 'zebra xylophone': the tokenizer encodes part of it as <unk>"):
        plant_canaries(data, CanaryConfig(count=1, prefix="zebra xylophone", alphabet=tuple("0123")), sorted(data.train))


def test_the_keyboard_check_asks_for_each_word_after_the_prefix_and_the_words_before_it():
    asked = []

    def suggest(text):  # a keyboard that knows the secret's first two words
        asked.append(text)
        return {"my pin is": ["the", "4", "a"], "my pin is 4": ["1", "x", "y"]}.get(text, ["a", "b", "c", "9"])

    assert suggested_words(suggest, "my pin is", ("4", "1", "9", "7")) == 2  # "9" is fourth: not in the top 3
    assert asked == ["my pin is", "my pin is 4", "my pin is 4 1", "my pin is 4 1 9"]


def _entry(repeats, exposure, *, completed=False, rounds=3, windows=2, phrase="my pin is 1 2 3"):
    return {"repeats": repeats, "exposure": exposure, "candidates": 4096, "top3_completed": completed,
            "trained_rounds": rounds, "trained_canary_windows": windows, "phrase": phrase}


def test_the_summary_line_gives_the_mean_exposure_per_repetition_count():
    entries = [_entry(16, 9.0, completed=True), _entry(1, 1.0), _entry(16, 7.0)]
    assert summary_line(entries) == ("canaries: mean exposure by repeats 1x 1.0, 16x 8.0 bits (at most 12.0, "
                                     "4096 candidates); top-3 completed 1 of 3")


def test_a_canary_its_device_never_trained_on_is_left_out_of_the_means_and_warned_of():
    entries = [_entry(16, 9.0), _entry(16, 1.2, rounds=0, windows=0, phrase="my pin is 4 4 4"),
               _entry(1, 1.5, rounds=2, windows=0, phrase="my pin is 0 1 2"), _entry(4, 5.0)]
    assert exposure_by_repeats(entries) == {"1": None, "4": 5.0, "16": 9.0}
    line, warning = summary_line(entries).split("\n")
    assert line.startswith("canaries: mean exposure by repeats 1x —, 4x 5.0, 16x 9.0 bits")
    assert warning == ("WARNING: 1 of 4 canary devices never trained ('my pin is 4 4 4'); 1 trained but never on a "
                       "window holding their canary ('my pin is 0 1 2'): their exposure measures nothing and is "
                       "left out of the means; run more rounds or a smaller fleet")


def test_the_window_sample_is_the_one_the_device_trains_on():
    windows = make_windows(np.arange(200, dtype=np.int32), 7)
    for seed in (0, 5):
        picked = sample_window_indices(len(windows), 10, seed=seed)
        assert np.array_equal(windows.take(picked).x, select_windows(windows, 10, seed=seed).x)
        assert len(picked) == 10 and np.all(np.diff(picked) > 0)
    assert np.array_equal(sample_window_indices(len(windows), 100, seed=0), np.arange(len(windows)))


def test_an_occurrence_is_whole_in_a_window_when_all_its_targets_are():
    # Window i predicts tokens i*T+1 .. (i+1)*T. An occurrence at s of 5 tokens predicts s+1 .. s+4.
    assert canary_windows(np.array([0]), 5, 4) == ({0}, {0})  # targets 1..4: window 0
    assert canary_windows(np.array([1]), 5, 4) == ({0, 1}, set())  # targets 2..5: split
    assert canary_windows(np.array([4, 13]), 5, 4) == ({1, 3, 4}, {1})  # 5..8 whole; 14..17 split


def test_the_audit_counts_the_trained_windows_that_held_each_canary(tiny_data):
    data = load_prepared(tiny_data)
    config = CanaryConfig(count=3, repeats=(1, 3, 6), alphabet=tuple("0123"), length=3, seed=2)
    planted, audit = plant_canaries(data, config, sorted(data.train))
    tokenizer = load_tokenizer(data.tokenizer_path)
    # windows a little longer than the canary: some occurrences fit in one, others are split across two
    seq_len, max_examples = len(canary_utterance(tokenizer, audit.canaries[0])) + 8, 8
    task = dataclasses.asdict(RoundTask(round_id=1, model_version=1, learning_rate=1.0, epochs=1, batch_size=2,
                                        max_examples=max_examples, clip_norm=1.0, deadline=0.0))
    rounds = [{c.device: SimpleNamespace(task=task, seed=seed) for c in audit.canaries} for seed in (11, 12, 13)]
    rounds.append({audit.canaries[0].device: SimpleNamespace(task=task, seed=14), "someone else": None})
    for trained in rounds:
        audit.record_training(trained, seq_len=seq_len)

    # Independently: the windows of the stream's positions, sampled by the device's own select_windows.
    expected_touched, expected_whole, sampled = {}, {}, False
    for canary in audit.canaries:
        stream = planted.train[canary.device].tolist()
        utterance = canary_utterance(tokenizer, canary).tolist()
        targets = [set(range(s + 1, s + len(utterance))) for s in range(len(stream))
                   if stream[s : s + len(utterance)] == utterance]
        assert len(targets) == canary.repeats
        positions = make_windows(np.arange(len(stream), dtype=np.int32), seq_len)
        sampled |= len(positions) > max_examples
        touched = whole = 0
        for trained in rounds:
            if canary.device in trained:
                for row in select_windows(positions, max_examples, seed=trained[canary.device].seed).y:
                    touched += any(set(row.tolist()) & t for t in targets)
                    whole += sum(t <= set(row.tolist()) for t in targets)
        expected_touched[canary.device], expected_whole[canary.device] = touched, whole
    assert sampled  # the device trains on a sample of its windows
    entries = {c.device: c for c in audit.canaries}
    counts = {d: (audit._trained[d], audit._canary_windows[d], audit._whole[d]) for d in entries}
    assert counts == {d: (4 if d == audit.canaries[0].device else 3, expected_touched[d], expected_whole[d])
                      for d in entries}
    assert any(expected_whole.values()) and sum(expected_touched.values()) > sum(expected_whole.values())
    assert {d: audit.device_windows(d) for d in entries} == {
        d: len(make_windows(planted.train[d], seq_len)) for d in entries}


def test_planting_keeps_other_streams_and_inserts_at_boundaries_chosen_with_the_seed(tiny_data):
    data = load_prepared(tiny_data)
    tokenizer = load_tokenizer(data.tokenizer_path)
    canaries = draw_canaries(CanaryConfig(count=1, repeats=(8,), alphabet=tuple("0123"), length=2), tuple("0123"),
                             sorted(data.train))
    a = plant(data.train, canaries, tokenizer, seed=0)
    assert np.array_equal(a[canaries[0].device], plant(data.train, canaries, tokenizer, seed=0)[canaries[0].device])
    assert not np.array_equal(a[canaries[0].device], plant(data.train, canaries, tokenizer, seed=1)[canaries[0].device])
