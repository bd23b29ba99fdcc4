"""Next-word suggestions (edge_runtime/suggest.py, `fedkb suggest`) on the tiny exported model, in LiteRT."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedkb.cli import main
from fedkb_core.errors import FedkbError
from fedkb_core.next_words import top_words
from edge_runtime.suggest import Suggester
from model import numpy_lm
from model.weights import load_weights
from tests.fixtures_model import *  # noqa: F401,F403

REPO = Path(__file__).resolve().parents[1]
PREFIXES = ["", "to be", "to be or not to", "whether tis nobler in the"]


class CountingStepper:
    """Wraps a Suggester's stepper and counts model steps."""

    def __init__(self, stepper):
        self.inner, self.calls = stepper, 0
        self.zero_state = stepper.zero_state

    def __call__(self, token, state):
        self.calls += 1
        return self.inner(token, state)


@pytest.fixture
def counted(tiny_model):
    suggester = Suggester(tiny_model)
    suggester.stepper = CountingStepper(suggester.stepper)
    return suggester


def _steps(suggester, text) -> int:
    before = suggester.stepper.calls
    suggester.feed_text(text)
    return suggester.stepper.calls - before


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_suggest_returns_k_distinct_words(tiny_model, prefix, k):
    words = Suggester(tiny_model).suggest(prefix, k=k)

    assert len(words) == k
    assert len(set(words)) == k
    for word in words:
        assert isinstance(word, str) and word and not any(ch.isspace() for ch in word)


def test_suggestions_rank_words_as_the_numpy_reference(tiny_float_model, tiny_config):
    # Same weights, same search: LiteRT's float step must score words as the numpy model does
    # (a swapped h/c would only show after the second piece), and the Suggester, which threads
    # that state from keystroke to keystroke, must rank what the straight run ranks.
    weights = load_weights(tiny_float_model / "weights.safetensors", tiny_config)
    suggester = Suggester(tiny_float_model)
    text = "to be or not to"
    state, numpy_state = suggester.stepper.zero_state(), (np.zeros(tiny_config.lstm_units, np.float32),) * 2
    for token in [2] + suggester.tokenizer.encode(text):  # BOS, then the pieces
        logits, state = suggester.stepper(token, state)
        numpy_logits, numpy_state = numpy_lm.step(weights, token, numpy_state)

    got = top_words(suggester.stepper, state, logits, suggester.word_start, k=16)
    want = top_words(lambda t, s: numpy_lm.step(weights, t, s), numpy_state, numpy_logits, suggester.word_start, k=16)
    np.testing.assert_allclose([w.log_prob for w in got], [w.log_prob for w in want], atol=1e-4)

    ranked = []  # the words of the straight run's ranking, as the strip shows them
    for candidate in got:
        word = suggester.tokenizer.decode(list(candidate.pieces)).strip()
        if word and word not in ranked:
            ranked.append(word)
    for end in range(1, len(text)):  # typed one keystroke at a time
        suggester.suggest(text[:end])
    assert len(ranked) >= 5 and suggester.suggest(text, k=5) == ranked[:5]


def test_longer_prefix_costs_only_the_new_pieces(counted):
    tokenizer = counted.tokenizer
    short, long = "to be or", "to be or not to"
    assert tokenizer.encode(long)[: len(tokenizer.encode(short))] == tokenizer.encode(short)

    assert _steps(counted, short) == len(tokenizer.encode(short))
    assert _steps(counted, long) == len(tokenizer.encode(long)) - len(tokenizer.encode(short))
    assert _steps(counted, long) == 0


def test_suggest_leaves_the_state_as_it_was(counted):
    first = counted.suggest("to be or not to")
    assert counted.stepper.calls > 0

    assert _steps(counted, "to be or not to") == 0
    assert counted.suggest("to be or not to") == first


def test_typing_keystroke_by_keystroke(counted, tiny_model):
    # Each keystroke costs its new pieces, plus one step when the word being typed re-tokenizes
    # ("▁no" -> "▁not"); suggestions equal those of a fresh suggester given the whole text.
    text = "whether tis nobler in the mind to suffer"
    fed: list[int] = []
    total = 0
    fresh = Suggester(tiny_model)
    for end in range(1, len(text) + 1):
        ids = counted.tokenizer.encode(text[:end])
        common = _common_prefix(ids, fed)

        steps = _steps(counted, text[:end])

        assert steps <= len(ids) - common + 1, text[:end]
        total += steps
        if end % 8 == 0:
            fresh.reset()
            assert counted.suggest(text[:end]) == fresh.suggest(text[:end])
        fed = ids
    # Replaying the whole prefix on every re-tokenization would cost about 3 steps per keystroke here.
    assert total < 2 * len(text)


@pytest.mark.parametrize("first, edited", [
    ("to be or not to", "the question"),  # different text: starts over
    ("to be or not to", "to be and not to"),  # an edit in the middle
    ("to be or not to", "to be"),  # deleted back
    ("to be or not to", ""),
])
def test_edited_text_gives_the_same_words_as_a_fresh_suggester(counted, tiny_model, first, edited):
    counted.suggest(first)
    ids = counted.tokenizer.encode(edited)
    common = _common_prefix(ids, counted.tokenizer.encode(first))

    steps = _steps(counted, edited)

    assert steps == (1 + len(ids) if common == 0 else len(ids) - common + 1)  # 1: BOS, or re-feeding one piece
    assert counted.suggest(edited) == Suggester(tiny_model).suggest(edited)


def test_reset_starts_a_new_utterance(counted):
    counted.suggest("to be or not to")
    counted.reset()
    calls = counted.stepper.calls

    assert _steps(counted, "to be") == len(counted.tokenizer.encode("to be"))
    assert counted.stepper.calls > calls


def test_device_side_never_imports_tensorflow(tiny_model):
    script = (
        "import sys, json\n"
        "from edge_runtime.suggest import Suggester\n"
        "from fedkb.cli import main\n"
        f"words = Suggester({str(tiny_model)!r}).suggest('to be or not to')\n"
        f"assert main(['suggest', '--model', {str(tiny_model)!r}, 'to be']) == 0\n"
        "print(json.dumps({'words': words, 'loaded': sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["words"]) == 3
    assert result["loaded"] == []


# --- the `fedkb suggest` command ------------------------------------------------------------------

def test_cli_prints_suggestions(tiny_model, capsys):
    assert main(["suggest", "--model", str(tiny_model), "to be or not to"]) == 0

    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].split("  ") == Suggester(tiny_model).suggest("to be or not to")


def test_cli_json_output(tiny_model, capsys):
    assert main(["suggest", "--model", str(tiny_model), "--format", "json", "-k", "5", "to be"]) == 0

    body = json.loads(capsys.readouterr().out)
    assert body == {"prefix": "to be", "suggestions": Suggester(tiny_model).suggest("to be", k=5)}


def _without(tiny_model, tmp_path, name):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / name).unlink()
    return broken


def _corrupt(tiny_model, tmp_path, name):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / name).write_bytes(b"not a flatbuffer")
    return broken


@pytest.mark.parametrize("make_dir, args, message", [
    (lambda m, t: t / "nowhere", [], "manifest.json: missing"),
    (lambda m, t: t, [], "manifest.json: missing"),  # a folder, but not a model version
    (lambda m, t: _without(m, t, "inference.tflite"), [], "inference model not found"),
    (lambda m, t: _corrupt(m, t, "inference.tflite"), [], "not an inference model"),
    (lambda m, t: _without(m, t, "tokenizer.model"), [], "tokenizer model not found"),
    (lambda m, t: m, ["-k", "0"], "-k must be at least 1"),
    (lambda m, t: m, ["-k", "-2"], "-k must be at least 1"),
], ids=["missing folder", "not a model folder", "no inference model", "corrupt inference model",
        "no tokenizer", "k=0", "k<0"])
def test_cli_errors_are_one_line_with_status_2(tiny_model, tmp_path, capsys, make_dir, args, message):
    model_dir = make_dir(tiny_model, tmp_path)

    status = main(["suggest", "--model", str(model_dir), *args, "to be"])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fedkb suggest: error:") and message in lines[0]


def test_trainable_model_is_not_an_inference_model(tiny_model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    shutil.copyfile(tiny_model / "trainable.tflite", broken / "inference.tflite")

    with pytest.raises(FedkbError, match="`step` signature"):
        Suggester(broken)
