"""`fedkb data prepare` end to end through the CLI, on Shakespeare and on user JSONL."""

import json

import numpy as np
import pytest

from datasets.prepared import load_prepared
from datasets.tokenizer import BOS_ID, EOS_ID, load_tokenizer
from fedkb.cli import main
from fedkb_core.errors import FedkbError
from tests.conftest import write_jsonl


def test_prepare_shakespeare_writes_tokenizer_and_stats(shakespeare_prepared):
    stats = json.loads((shakespeare_prepared / "stats.json").read_text())
    assert stats["num_clients"] >= 600
    assert stats["num_clients"] == stats["num_train_clients"] + stats["num_heldout_clients"]
    assert 700_000 < stats["num_words"] < 880_000
    assert stats["num_tokens"] > stats["num_words"]
    q = stats["words_per_client"]
    assert 64 <= q["min"] <= q["p50"] <= q["max"]
    assert len(stats["heldout_clients"]) == stats["num_heldout_clients"] > 0
    data = load_prepared(shakespeare_prepared)
    assert set(data.heldout) == set(stats["heldout_clients"])
    assert set(data.train) == set(data.test) and set(data.train).isdisjoint(data.heldout)
    hamlet = data.train.get("hamlet:HAMLET")
    assert hamlet is not None and hamlet[0] == BOS_ID and hamlet[-1] == EOS_ID
    tok = load_tokenizer(data.tokenizer_path)
    assert "be" in tok.decode(hamlet[:400].tolist())


def test_prepare_jsonl_via_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "users.jsonl", clients=12, lines_per_client=10)
    out = tmp_path / "prepared"
    code = main(["data", "prepare", "--dataset", f"jsonl:{src}", "--out", str(out), "--min-words", "10",
                 "--vocab-size", "50", "--format", "json"])
    assert code == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_clients"] == 12 and stats["num_heldout_clients"] == 1
    data = load_prepared(out)
    assert data.vocab_size == stats["vocab_size"] <= 50
    for cid, stream in data.train.items():
        assert np.count_nonzero(stream == BOS_ID) == 8  # 10 lines, last 2 to test
        assert np.count_nonzero(data.test[cid] == BOS_ID) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--dataset", "jsonl:/does/not/exist.jsonl"], "no such file"),
        (["--min-words", "100000"], "lower --min-words"),
        (["--test-fraction", "1.5"], "test_fraction must be in (0, 1)"),
        (["--max-clients", "0"], "--max-clients must be at least 1"),
    ],
)
def test_prepare_bad_settings_fail_with_one_line(tmp_path, capsys, argv, message):
    src = write_jsonl(tmp_path / "users.jsonl")
    args = ["data", "prepare", "--out", str(tmp_path / "o"), "--dataset", f"jsonl:{src}"] + argv
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_prepare_into_unwritable_location_fails_clearly(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "prepare", "--dataset", "jsonl:x", "--out", str(blocker / "sub")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_load_prepared_detects_foreign_tokenizer(tmp_path, shakespeare_prepared):
    src = write_jsonl(tmp_path / "users.jsonl", clients=12, lines_per_client=10)
    out = tmp_path / "p"
    assert main(["-q", "data", "prepare", "--dataset", f"jsonl:{src}", "--out", str(out), "--min-words", "10",
                 "--vocab-size", "50"]) == 0
    (out / "tokenizer.model").write_bytes((shakespeare_prepared / "tokenizer.model").read_bytes())
    with pytest.raises(FedkbError, match="does not match the tokenizer"):
        load_prepared(out)
    with pytest.raises(FedkbError, match="run `fedkb data prepare"):
        load_prepared(tmp_path / "nothing")
