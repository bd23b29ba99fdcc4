"""The example store: a real SQLite file, retention by age and size, deletion on request."""

from __future__ import annotations

import pytest

from datasets.tokenizer import BOS_ID, EOS_ID
from edge_runtime.store import ExampleStore, RetentionPolicy
from fedkb_core.errors import FedkbError

DAY = 86400.0


@pytest.fixture
def clock():
    now = [1_000_000.0]
    return now


@pytest.fixture
def store(tmp_path, clock):
    with ExampleStore(tmp_path / "examples.sqlite", clock=lambda: clock[0]) as s:
        yield s


def test_add_and_read_back_in_order(store):
    ids = [store.add(t) for t in ("hello there", "  ", "how are you  ")]
    assert ids[1] is None  # blank text is not a message
    assert store.texts() == ["hello there", "how are you"]
    assert store.count() == 2 and store.total_bytes() == len("hello there") + len("how are you")


def test_file_is_private_and_persists(tmp_path, clock):
    path = tmp_path / "examples.sqlite"
    with ExampleStore(path) as s:
        s.add("kept across restarts")
    assert path.stat().st_mode & 0o077 == 0
    with ExampleStore(path) as s:
        assert s.texts() == ["kept across restarts"]


def test_import_is_idempotent_and_appends_only_new_lines(store):
    assert store.import_lines(["a b", "c d", "", "a b"], source="f") == 3  # a repeated line is a new message
    assert store.import_lines(["a b", "c d", "", "a b"], source="f") == 0
    assert store.import_lines(["a b", "c d", "", "a b", "e f"], source="f") == 1
    assert store.import_lines(["a b"], source="other file") == 1
    assert store.count() == 5


def test_retention_by_age(store, clock):
    store.add("old", created=clock[0] - 31 * DAY)
    store.add("recent", created=clock[0] - 29 * DAY)
    assert store.enforce_retention() == 1
    assert store.texts() == ["recent"]
    clock[0] += 2 * DAY
    assert store.enforce_retention() == 1 and store.count() == 0


def test_retention_by_size_drops_oldest_first(tmp_path, clock):
    with ExampleStore(tmp_path / "s.sqlite", retention=RetentionPolicy(max_bytes=25), clock=lambda: clock[0]) as s:
        for i in range(5):
            s.add(f"message {i:02d}")  # 10 bytes each
        assert s.enforce_retention() == 3
        assert s.texts() == ["message 03", "message 04"]
        assert s.total_bytes() <= 25


def test_import_applies_retention(tmp_path):
    with ExampleStore(tmp_path / "s.sqlite", retention=RetentionPolicy(max_bytes=10)) as s:
        s.import_lines(["0123456789", "abcdefghij"], source="f")
        assert s.texts() == ["abcdefghij"]


def test_delete_all_erases_the_text_from_the_file(tmp_path):
    path = tmp_path / "examples.sqlite"
    secret = "my very secret sentence"
    with ExampleStore(path) as s:
        for i in range(50):
            s.add(f"{secret} {i}")
        assert s.delete_all() == 50
        assert s.count() == 0
    assert secret.encode() not in path.read_bytes()


def test_delete_since(store, clock):
    store.add("earlier", created=clock[0] - 3600)
    store.add("just now", created=clock[0] - 60)
    assert store.delete_since(clock[0] - 600) == 1
    assert store.texts() == ["earlier"]


def test_new_example_cursor_survives_deletion(store):
    first = [store.add(f"m{i}") for i in range(4)]
    assert store.new_examples() == 4
    store.mark_trained(first[-1])
    assert store.new_examples() == 0
    store.add("after")
    assert store.new_examples() == 1
    store.delete_all()
    store.add("fresh")  # ids never go back, so the cursor still separates old from new
    assert store.new_examples() == 1 and store.last_id() == 6
    store.mark_trained(2)  # the cursor never moves back
    assert store.new_examples() == 1


def test_token_windows(store, edge_tokenizer):
    assert len(store.token_windows(edge_tokenizer, 6)) == 0
    store.add("to be or not to be")
    last = store.add("that is the question")
    store.add("typed later")
    windows = store.token_windows(edge_tokenizer, 6, up_to_id=last)
    assert windows.x[0, 0] == BOS_ID and EOS_ID in windows.y
    assert windows.x.shape[1] == 6 and windows.mask.sum() > 0
    assert len(store.token_windows(edge_tokenizer, 6)) >= len(windows)


def test_not_a_database(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FedkbError, match="cannot open the example store"):
        ExampleStore(bad)


@pytest.fixture(scope="module")
def edge_tokenizer(tmp_path_factory):
    from datasets.tokenizer import tokenizer_from_bytes, train_tokenizer
    from tests.conftest import SAMPLE_LINES

    return tokenizer_from_bytes(train_tokenizer(SAMPLE_LINES * 4, vocab_size=40))
