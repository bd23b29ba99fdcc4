"""Keyboard metrics (model/metrics.py) by hand, and evaluate_weights on a tiny prepared set."""

import dataclasses
import math

import numpy as np
import pytest

from datasets.prepared import load_prepared
from datasets.tokenizer import BOS_ID, EOS_ID, load_tokenizer, word_start_table
from datasets.windows import concat_windows, iterate_batches, make_windows
from model.evaluation import EvalConfig, evaluate_weights
from model.metrics import count_words, perplexity, recall_at
from model.weights import initial_weights, weight_specs
from tests.fixtures_model import *  # noqa: F401,F403

# ids 0-3 are pad, unk, bos, eos; 4 "▁to", 5 "b", 6 "▁be", 7 "e"
WORD_START = np.array([False, False, False, True, True, False, True, False])


# --- perplexity, count_words, recall_at: tiny arrays checked by hand ----------------------------

@pytest.mark.parametrize("total_nll, count, expected", [
    (0.0, 10, 1.0),
    (10 * math.log(4.0), 10, 4.0),
    (3 * math.log(60.0), 3, 60.0),
    (0.5, 0, math.inf),  # empty set: inf, not ZeroDivisionError
    (0.5, -1, math.inf),
])
def test_perplexity(total_nll, count, expected):
    assert perplexity(total_nll, count) == pytest.approx(expected, rel=1e-12)


def test_perplexity_of_a_diverged_model_is_capped_not_overflowing():
    assert perplexity(1e9, 1) == pytest.approx(math.exp(700.0))


@pytest.mark.parametrize("y, mask, expected", [
    ([[4, 5, 6, 3]], [[1, 1, 1, 1]], 3),  # ▁to, (b), ▁be, EOS: EOS ends the utterance's last word
    ([[4, 5, 6, 3]], [[1, 1, 1, 0]], 2),  # masked EOS is not counted
    ([[5, 7, 5, 7]], [[1, 1, 1, 1]], 0),  # continuation pieces only
    ([[4, 4, 0, 0], [6, 7, 3, 0]], [[1, 1, 0, 0], [1, 1, 1, 0]], 4),  # padding under a zero mask
    ([[2, 1, 0, 4]], [[1, 1, 1, 1]], 1),  # bos, unk and pad never start a word
])
def test_count_words(y, mask, expected):
    assert count_words(np.array(y), np.array(mask, np.float32), WORD_START) == expected


@pytest.mark.parametrize("k, expected", [(1, 0.2), (2, 0.4), (3, 0.6), (10, 0.8)])
def test_recall_at(k, expected):
    hits = np.array([0, 2, -1, 1, 5])  # ranks of the right word, -1 = not suggested
    assert recall_at(hits, k) == pytest.approx(expected)


def test_recall_at_empty_is_zero():
    assert recall_at(np.array([], np.int64), 3) == 0.0


# --- evaluate_weights on the tiny prepared set ---------------------------------------------------

@pytest.fixture(scope="module")
def heldout(tiny_data):
    data = load_prepared(tiny_data)
    return data.heldout, word_start_table(load_tokenizer(data.tokenizer_path))


def _zero_weights(config):
    return {s.name: np.zeros(s.shape, np.float32) for s in weight_specs(config)}


def _words_in_streams(streams, tokenizer) -> int:
    """Independent word count: whitespace words of each decoded utterance, plus one for its EOS."""
    words = 0
    for stream in streams.values():
        utterances = np.split(stream, np.nonzero(stream == BOS_ID)[0])
        for utterance in utterances:
            pieces = [int(t) for t in utterance if t not in (BOS_ID, EOS_ID)]
            words += len(tokenizer.decode(pieces).split()) + int(np.sum(utterance == EOS_ID))
    return words


def test_zero_weights_give_uniform_perplexity(heldout, tiny_config):
    streams, word_start = heldout
    V = tiny_config.vocab_size

    result = evaluate_weights(_zero_weights(tiny_config), streams, word_start, EvalConfig(seq_len=tiny_config.seq_len))

    # All-zero weights give all-zero logits: every piece has probability exactly 1/V.
    assert result.token_perplexity == pytest.approx(V, rel=1e-6)
    assert result.word_perplexity == pytest.approx(V ** (result.tokens / result.words), rel=1e-5)
    assert 0 < result.words < result.tokens
    assert 0 < result.recall_samples <= EvalConfig().recall_samples


def test_counts_cover_the_whole_set_and_match_an_independent_count(heldout, tiny_data, tiny_config):
    streams, word_start = heldout
    tokenizer = load_tokenizer(load_prepared(tiny_data).tokenizer_path)
    config = EvalConfig(seq_len=tiny_config.seq_len, max_windows=10_000)

    result = evaluate_weights(initial_weights(tiny_config), streams, word_start, config)

    # Every piece and EOS is predicted once; BOS never is (nothing predicts that a message starts).
    assert result.tokens == sum(int(np.sum(s != BOS_ID)) for s in streams.values())
    assert result.words == _words_in_streams(streams, tokenizer)


def test_token_perplexity_matches_keras_masked_nll(heldout, tiny_config):
    pytest.importorskip("tensorflow")
    from model.keras_model import build_keras_model, masked_nll

    streams, word_start = heldout
    rng = np.random.default_rng(0)
    weights = {n: (w + rng.normal(0, 0.3, w.shape)).astype(np.float32) for n, w in initial_weights(tiny_config).items()}
    windows = concat_windows([make_windows(s, tiny_config.seq_len) for s in streams.values()])
    total, count = masked_nll(windows.y, build_keras_model(tiny_config, weights)(windows.x), windows.mask)

    result = evaluate_weights(weights, streams, word_start, EvalConfig(seq_len=tiny_config.seq_len, max_windows=10_000))

    assert result.tokens == int(count)
    assert result.token_perplexity == pytest.approx(math.exp(float(total) / float(count)), rel=1e-5)


def test_sample_is_fixed_by_the_seed(heldout, tiny_config):
    streams, word_start = heldout
    weights = initial_weights(tiny_config)
    small = EvalConfig(seq_len=tiny_config.seq_len, max_windows=20, recall_samples=7)

    first = evaluate_weights(weights, streams, word_start, small)
    again = evaluate_weights(weights, streams, word_start, small)
    full = evaluate_weights(weights, streams, word_start, dataclasses.replace(small, max_windows=10_000))

    assert first == again
    assert first.recall_samples == 7
    assert first.tokens < full.tokens


@pytest.mark.parametrize("streams", [{}, {"a": np.array([2], np.int32)}, {"a": np.zeros(0, np.int32)}],
                         ids=["no clients", "one token", "empty stream"])
def test_no_evaluation_text_is_an_error(streams, tiny_config):
    with pytest.raises(ValueError, match="no evaluation text"):
        evaluate_weights(initial_weights(tiny_config), streams, WORD_START, EvalConfig(seq_len=4))


def _train_keras(config, weights, batches, lr):
    from model.keras_model import build_keras_model, get_keras_weights, make_sgd_step

    model = build_keras_model(config, weights)
    step = make_sgd_step(model, lr)
    for batch in batches:
        step(batch.x, batch.y, batch.mask)
    return get_keras_weights(model)


def _train_litert(model_dir, weights, batches, lr):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_dir / "trainable.tflite"), num_threads=2)
    interpreter.get_signature_runner("set_weights")(**weights)
    train = interpreter.get_signature_runner("train")
    for batch in batches:
        train(x=batch.x, y=batch.y, mask=batch.mask, lr=np.float32(lr))
    return dict(interpreter.get_signature_runner("get_weights")())


@pytest.mark.parametrize("trainer", ["keras", "litert"])
def test_metrics_improve_after_a_few_sgd_steps(trainer, heldout, tiny_data, tiny_model, tiny_config):
    if trainer == "keras":
        pytest.importorskip("tensorflow")
    streams, word_start = heldout
    train = load_prepared(tiny_data).train
    windows = concat_windows([make_windows(s, tiny_config.seq_len) for s in train.values()])
    batches = list(iterate_batches(windows, batch_size=tiny_config.batch_size, seed=0))[:30]
    before_weights = initial_weights(tiny_config)
    config = EvalConfig(seq_len=tiny_config.seq_len)

    if trainer == "keras":
        after_weights = _train_keras(tiny_config, before_weights, batches, lr=1.0)
    else:
        after_weights = _train_litert(tiny_model, before_weights, batches, lr=1.0)
    before = evaluate_weights(before_weights, streams, word_start, config)
    after = evaluate_weights(after_weights, streams, word_start, config)

    # Held-out clients only (never trained on). 30 SGD steps of a 16-unit model learn the piece
    # frequencies, which is what moves perplexity; top-1/top-3 need far more training to move.
    assert after.token_perplexity < 0.85 * before.token_perplexity
    assert after.word_perplexity < 0.6 * before.word_perplexity
    assert (after.tokens, after.words) == (before.tokens, before.words)
