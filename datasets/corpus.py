"""The in-memory shape of a federated text corpus: clients, each with its utterances."""

from __future__ import annotations

import dataclasses
from collections import Counter


@dataclasses.dataclass(frozen=True)
class ClientText:
    """One client's text, as a list of utterances (a speech, a message) in typing order."""

    client_id: str
    utterances: tuple[str, ...]

    @property
    def num_words(self) -> int:
        return sum(len(u.split()) for u in self.utterances)


@dataclasses.dataclass
class LoadReport:
    """What a loader skipped and why, so a skip is counted and reported, never silent."""

    source: str
    skipped: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, str] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped item; keep the first place each reason occurred."""
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "skipped": dict(self.skipped),
            "first_skipped_at": dict(self.examples),
        }


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Clients in a stable order (sorted by id) plus the loader's report."""

    name: str
    clients: tuple[ClientText, ...]
    report: LoadReport

    @property
    def num_words(self) -> int:
        return sum(c.num_words for c in self.clients)


def build_corpus(name: str, utterances_by_client: dict[str, list[str]], report: LoadReport) -> Corpus:
    """Drop empty utterances and clients, sort by client id, freeze."""
    clients = []
    for client_id in sorted(utterances_by_client):
        utterances = tuple(u for u in (" ".join(x.split()) for x in utterances_by_client[client_id]) if u)
        if not utterances:
            report.skip("empty client", client_id)
            continue
        clients.append(ClientText(client_id, utterances))
    return Corpus(name=name, clients=tuple(clients), report=report)
