"""Loaders for the user's own text: valid input, and every malformed case named precisely."""

import json

import pytest

from datasets.sources import load_dataset
from datasets.user_text import load_csv, load_folder, load_jsonl
from fedkb_core.errors import FedkbError


def test_jsonl_groups_lines_by_client_and_counts_skips(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(
        json.dumps({"client_id": "a", "text": "hello there"}) + "\n"
        + json.dumps({"client_id": 7, "text": "good  morning"}) + "\n"
        + "\n"
        + json.dumps({"client_id": "a", "text": "   "}) + "\n"
        + json.dumps({"client_id": "a", "text": "see you"}) + "\n",
        encoding="utf-8",
    )
    corpus = load_dataset(f"jsonl:{path}")
    assert [(c.client_id, c.utterances) for c in corpus.clients] == [
        ("7", ("good morning",)),
        ("a", ("hello there", "see you")),
    ]
    assert corpus.report.skipped == {"blank line": 1, "empty text": 1}
    assert corpus.report.examples["empty text"] == f"{path}:4"


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"client_id": "a", "text": "ok"}\n{"client_id": "a", "text": \n', ":2: not valid JSON"),
        (b'{"client_id": "a"}\n', ":1: missing key(s) text"),
        (b'["a", "b"]\n', ":1: expected a JSON object"),
        (b'{"client_id": "a", "text": 3}\n', ":1: 'text' must be a string"),
        (b'{"client_id": "", "text": "x"}\n', ":1: 'client_id' must be a non-empty"),
        (b'{"client_id": "a", "text": "ok"}\n{"client_id": "a", "text": "caf\xe9"}\n', ":2: not valid UTF-8"),
        (b'{"client_id": "a", "text": " "}\n', "no client has any text"),
    ],
)
def test_jsonl_malformed_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(FedkbError, match=str(path).replace(".", r"\.") if message.startswith(":") else None) as err:
        load_jsonl(path)
    assert message in str(err.value)


def test_csv_reads_named_columns_in_any_order(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text('text,client_id\n"hi, there",a\nbye,b\n,a\n', encoding="utf-8")
    corpus = load_csv(path)
    assert [(c.client_id, c.utterances) for c in corpus.clients] == [("a", ("hi, there",)), ("b", ("bye",))]
    assert corpus.report.skipped == {"empty text": 1}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"user,text\na,hello\n", ":1: header lacks column(s) client_id"),
        (b"client_id,text\na,hello,extra\n", ":2: expected 2 fields, found 3"),
        (b"client_id,text\na,hello\nb,caf\xe9\n", ":3: not valid UTF-8"),
        (b"", "empty file"),
    ],
)
def test_csv_malformed_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(FedkbError) as err:
        load_csv(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_folder_one_file_per_client(tmp_path):
    (tmp_path / "alice.txt").write_text("first line\n\nsecond line\n", encoding="utf-8")
    (tmp_path / "bob.txt").write_text("only line", encoding="utf-8")
    (tmp_path / "carol.txt").write_text("\n\n", encoding="utf-8")
    corpus = load_folder(tmp_path)
    assert [(c.client_id, c.utterances) for c in corpus.clients] == [
        ("alice", ("first line", "second line")),
        ("bob", ("only line",)),
    ]
    assert corpus.report.skipped == {"empty file": 1, "empty client": 1}


def test_folder_errors(tmp_path):
    with pytest.raises(FedkbError, match="no such folder"):
        load_folder(tmp_path / "missing")
    with pytest.raises(FedkbError, match="has no files"):
        load_folder(tmp_path)
    (tmp_path / "x.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(FedkbError, match=r"x\.txt:2: not valid UTF-8"):
        load_folder(tmp_path)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("wikipedia", "unknown dataset 'wikipedia'"),
        ("jsonl:", "needs a path"),
        ("jsonl:/nonexistent/file.jsonl", "no such file"),
        ("shakespeare:extra", "unknown dataset"),
    ],
)
def test_dataset_spec_errors(spec, message):
    with pytest.raises(FedkbError, match=message):
        load_dataset(spec)
