"""The user's own per-client text: JSONL, CSV, or a folder with one text file per client.

Structural problems (a line that is not JSON, a missing column, bytes that are not UTF-8) stop
the load with an error naming the file and line: guessing would silently train on the wrong
data. Rows that are well-formed but empty are skipped and counted in the report.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from datasets.corpus import Corpus, LoadReport, build_corpus
from fedkb_core.errors import FedkbError

_REQUIRED = ("client_id", "text")


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise FedkbError(f"{path}: no such file")
    if not path.is_file():
        raise FedkbError(f"{path}: not a file")
    return path


def _read_utf8_lines(path: Path):
    """Yield (line_number, text) and name the exact line of any bytes that are not UTF-8."""
    with open(_existing_file(path), "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise FedkbError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _add(by_client, report, client_id, text, where: str) -> None:
    if not isinstance(client_id, (str, int)) or isinstance(client_id, bool) or str(client_id).strip() == "":
        raise FedkbError(f"{where}: 'client_id' must be a non-empty string or integer, got {client_id!r}")
    if not isinstance(text, str):
        raise FedkbError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        report.skip("empty text", where)
        return
    by_client[str(client_id).strip()].append(text)


def load_jsonl(path: Path) -> Corpus:
    """One JSON object per line: {"client_id": ..., "text": ...}; many lines per client."""
    path = Path(path)
    report = LoadReport(source=f"jsonl:{path}")
    by_client: dict[str, list[str]] = defaultdict(list)
    for number, line in _read_utf8_lines(path):
        where = f"{path}:{number}"
        if not line.strip():
            report.skip("blank line", where)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FedkbError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise FedkbError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in _REQUIRED if k not in record]
        if missing:
            raise FedkbError(f"{where}: missing key(s) {', '.join(missing)}")
        _add(by_client, report, record["client_id"], record["text"], where)
    return _finish("jsonl", path, by_client, report)


def load_csv(path: Path) -> Corpus:
    """A CSV file with a header naming at least the columns client_id and text."""
    path = Path(path)
    report = LoadReport(source=f"csv:{path}")
    by_client: dict[str, list[str]] = defaultdict(list)
    lines = (line for _, line in _read_utf8_lines(path))
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise FedkbError(f"{path}: empty file (expected a header with client_id,text)") from None
    except csv.Error as err:
        raise FedkbError(f"{path}:1: malformed CSV ({err})") from None
    header = [h.strip() for h in header]
    missing = [k for k in _REQUIRED if k not in header]
    if missing:
        raise FedkbError(f"{path}:1: header lacks column(s) {', '.join(missing)} (found: {', '.join(header)})")
    id_col, text_col = header.index("client_id"), header.index("text")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise FedkbError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
        where = f"{path}:{reader.line_num}"
        if not row:
            report.skip("blank line", where)
            continue
        if len(row) != len(header):
            raise FedkbError(f"{where}: expected {len(header)} fields, found {len(row)}")
        _add(by_client, report, row[id_col], row[text_col], where)
    return _finish("csv", path, by_client, report)


def load_folder(path: Path) -> Corpus:
    """A folder with one UTF-8 text file per client (client id = file name without suffix).

    Each non-blank line of a file is one utterance.
    """
    path = Path(path)
    if not path.is_dir():
        raise FedkbError(f"{path}: no such folder")
    report = LoadReport(source=f"dir:{path}")
    by_client: dict[str, list[str]] = defaultdict(list)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FedkbError(f"{path}: the folder has no files (expected one text file per client)")
    for file in files:
        if file.stem in by_client:
            raise FedkbError(f"{file}: client id {file.stem!r} also names another file in {path}")
        by_client[file.stem] = []
        for number, line in _read_utf8_lines(file):
            if line.strip():
                by_client[file.stem].append(line)
        if not by_client[file.stem]:
            report.skip("empty file", str(file))
    return _finish("dir", path, by_client, report)


def _finish(kind: str, path: Path, by_client, report: LoadReport) -> Corpus:
    corpus = build_corpus(f"{kind}:{path}", dict(by_client), report)
    if not corpus.clients:
        raise FedkbError(f"{path}: no client has any text")
    return corpus
