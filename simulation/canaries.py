"""A memorization audit: canary phrases planted in chosen devices' text (`fedkb simulate --canaries`).

After Carlini et al., 2019 ("The Secret Sharer") and Thakkar et al., 2020 ("Understanding
Unintended Memorization in Federated Learning"): K random phrases, a fixed prefix and L secret
words drawn from an alphabet with a seeded generator ("my pin is 4 1 9 7"), are typed on K of
the fleet's devices, canary k `repeats[k mod len(repeats)]` times, each time as one more utterance
at a random place between that device's utterances. The planted utterances are tokenized with
the data's tokenizer as `fedkb data prepare` tokenizes real text (`encode_utterances`), into the
device's training stream only: its test split and the held-out clients are never touched, and the
emulated phone cuts them into windows like the rest of its text.

What is measured, on the published versions as the fleet downloads them:
* exposure (`simulation.exposure`) under the final version, by the log-perplexity in bits of the
  secret and the end of the utterance after BOS and the prefix (the prefix's own term is the same
  for every candidate, so it changes no rank);
* whether the keyboard completes the secret: the LiteRT suggester of each version, given the
  prefix and the secret's words before each one, offers that word in its top 3, for every word.

The report keeps the phrases in clear: they are synthetic, planted by the audit itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from datasets.prepared import PreparedData
from datasets.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, encode_utterances
from fedkb_core.errors import FedkbError
from simulation.exposure import MAX_SPACE, Exposure, Scorer, measure_exposures, space_size

log = logging.getLogger(__name__)

DIGITS = tuple("0123456789")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALPHABETS = {"digits": DIGITS, "number-words": NUMBER_WORDS}
TOP_K = 3  # the keyboard's suggestion strip


@dataclasses.dataclass(frozen=True)
class CanaryConfig:
    """What the audit plants and how it ranks."""

    count: int = 0  # K canaries, each on its own device; 0: no audit
    repeats: tuple[int, ...] = (1, 4, 16)  # canary k is typed repeats[k % len(repeats)] times
    prefix: str = "my pin is"
    length: int = 4  # secret words after the prefix
    # The secret's words. None: the ten digits, or the number words for a tokenizer that lacks a
    # digit (Shakespeare's has none).
    alphabet: tuple[str, ...] | None = None
    max_candidates: int = 10_000  # score every candidate of a space up to this size; sample beyond
    seed: int = 0

    def problems(self) -> list[str]:
        """What is out of range, one message per setting (empty when valid)."""
        problems = []
        if self.count < 0:
            problems.append(f"--canaries must not be negative, got {self.count}")
        if not self.repeats or any(r < 1 for r in self.repeats):
            problems.append(f"--canary-repeats must be one or more counts of at least 1, got {list(self.repeats)}")
        if not self.prefix.split():
            problems.append("--canary-prefix must have at least one word")
        if self.length < 1:
            problems.append(f"--canary-length must be at least 1, got {self.length}")
        if self.alphabet is not None:
            if len(set(self.alphabet)) < 2:
                problems.append(f"--canary-alphabet needs at least two distinct words, got {list(self.alphabet)}")
            if any(len(w.split()) != 1 or w != w.strip() for w in self.alphabet):
                problems.append("--canary-alphabet words must each be one word without spaces")
        if self.max_candidates < 100:
            problems.append(f"--canary-candidates must be at least 100, got {self.max_candidates}")
        alphabet_size = len(set(self.alphabet or DIGITS))
        if self.length >= 1 and alphabet_size >= 2:
            if alphabet_size ** self.length > MAX_SPACE:
                problems.append(f"--canary-length {self.length} over {alphabet_size} words is more than 2^62 candidates")
            elif self.count > alphabet_size ** self.length // 2:
                problems.append(f"--canaries {self.count} is too many for {alphabet_size}^{self.length} candidates")
        return problems


@dataclasses.dataclass(frozen=True)
class Canary:
    device: str  # the training client it is planted in
    repeats: int
    secret: tuple[int, ...]  # indices into the alphabet
    words: tuple[str, ...]  # the secret's words
    phrase: str  # prefix + secret, as typed


def resolve_alphabet(config: CanaryConfig, tokenizer) -> tuple[str, ...]:
    """The secret's words, each of which the tokenizer must encode without <unk> (an unknown
    word would make different secrets the same tokens)."""
    def unknown(words: Iterable[str]) -> list[str]:
        return [w for w in words if UNK_ID in tokenizer.encode(w)]

    if config.alphabet is None:
        for alphabet in (DIGITS, NUMBER_WORDS):
            if not unknown(alphabet):
                return alphabet
        raise FedkbError(f"the tokenizer encodes digits ({', '.join(unknown(DIGITS))}) and number words "
                         f"({', '.join(unknown(NUMBER_WORDS))}) as <unk>; give the secret's words with "
                         "--canary-alphabet w1,w2,...")
    missing = unknown(config.alphabet)
    if missing:
        raise FedkbError(f"--canary-alphabet: the tokenizer encodes {', '.join(missing)} as <unk>; choose words "
                         "it knows")
    return tuple(dict.fromkeys(config.alphabet))


def draw_canaries(config: CanaryConfig, alphabet: Sequence[str], devices: Sequence[str]) -> list[Canary]:
    """K distinct random secrets on K distinct devices drawn from `devices`, with the config's seed."""
    if config.count > len(devices):
        raise FedkbError(f"--canaries {config.count} needs as many emulated devices; --clients is {len(devices)}")
    rng = np.random.default_rng([config.seed, 0xCA7A])
    chosen = rng.choice(len(devices), size=config.count, replace=False)
    secrets: list[tuple[int, ...]] = []
    while len(secrets) < config.count:
        secret = tuple(int(i) for i in rng.integers(0, len(alphabet), size=config.length))
        if secret not in secrets:
            secrets.append(secret)
    canaries = []
    for k, (device, secret) in enumerate(zip(chosen, secrets, strict=True)):
        words = tuple(alphabet[i] for i in secret)
        canaries.append(Canary(device=devices[int(device)], repeats=config.repeats[k % len(config.repeats)],
                               secret=secret, words=words, phrase=" ".join([config.prefix, *words])))
    return canaries


def canary_utterance(tokenizer, canary: Canary) -> np.ndarray:
    """The canary as one utterance of the token stream (BOS, pieces, EOS), as real text is encoded."""
    return encode_utterances(tokenizer, [canary.phrase])


def plant(streams: dict[str, np.ndarray], canaries: Sequence[Canary], tokenizer, *, seed: int = 0
          ) -> dict[str, np.ndarray]:
    """The streams with each canary inserted `repeats` times at utterance boundaries (before a
    BOS, or at the end) of its device's stream, chosen at random; the others are the same arrays."""
    rng = np.random.default_rng([seed, 0x91A7])
    planted = dict(streams)
    for canary in canaries:
        stream = np.asarray(planted[canary.device], dtype=np.int32)
        utterance = canary_utterance(tokenizer, canary)
        boundaries = np.append(np.flatnonzero(stream == BOS_ID), len(stream))
        places = np.sort(rng.choice(boundaries, size=canary.repeats, replace=True))
        parts, start = [], 0
        for place in places:
            parts += [stream[start:place], utterance]
            start = place
        parts.append(stream[start:])
        planted[canary.device] = np.concatenate(parts).astype(np.int32)
    return planted


def plant_canaries(data: PreparedData, config: CanaryConfig, fleet_clients: Sequence[str]
                   ) -> tuple[PreparedData, "CanaryAudit"]:
    """The data with the canaries in their devices' training streams, and the audit that measures them.

    Raises:
        FedkbError: a setting out of range, an alphabet or prefix the tokenizer cannot encode, or
            more canaries than devices.
    """
    from datasets.tokenizer import load_tokenizer

    problems = config.problems()
    if problems:
        raise FedkbError("; ".join(problems))
    tokenizer = load_tokenizer(data.tokenizer_path)
    if UNK_ID in tokenizer.encode(config.prefix):
        raise FedkbError(f"--canary-prefix {config.prefix!r}: the tokenizer encodes part of it as <unk>")
    alphabet = resolve_alphabet(config, tokenizer)
    canaries = draw_canaries(config, alphabet, sorted(fleet_clients))
    audit = CanaryAudit(canaries, config=config, alphabet=alphabet, tokenizer=tokenizer)
    for canary in canaries:
        if not np.array_equal(tokenizer.encode(canary.phrase), audit.context[1:] + audit.secret_pieces(canary.secret)):
            raise FedkbError(f"the tokenizer encodes {canary.phrase!r} other than its words one by one")
    train = plant(data.train, canaries, tokenizer, seed=config.seed)
    log.info("planted %d canaries (%s) in %d devices' training text", len(canaries),
             ", ".join(f"{c.repeats}x" for c in canaries), len(canaries))
    return dataclasses.replace(data, train=train), audit


def model_scorer(weights, context: Sequence[int], words: Sequence[Sequence[int]], *, batch: int = 1024) -> Scorer:
    """−log2 P(the secret's pieces, then EOS | context) under the LSTM `weights` (numpy).

    Args:
        context: BOS and the prefix's pieces, what every candidate follows.
        words: the pieces of each alphabet word.
    """
    from model import numpy_lm
    from model.metrics import token_nll

    units = weights["lstm_recurrent_kernel"].shape[0]
    state = (np.zeros(units, np.float32), np.zeros(units, np.float32))
    for token in context[:-1]:
        state = numpy_lm.step(weights, token, state)[1]
    last = int(context[-1])

    def score(secrets: np.ndarray) -> np.ndarray:
        out = np.empty(len(secrets), np.float64)
        for start in range(0, len(secrets), batch):
            rows = secrets[start : start + batch]
            sequences = [[p for symbol in row for p in words[symbol]] + [EOS_ID] for row in rows]
            steps = max(len(s) for s in sequences)
            y = np.full((len(rows), steps), PAD_ID, np.int32)
            for i, s in enumerate(sequences):
                y[i, : len(s)] = s
            x = np.concatenate([np.full((len(rows), 1), last, np.int32), y[:, :-1]], axis=1)
            h = np.broadcast_to(state[0], (len(rows), units)).copy()
            c = np.broadcast_to(state[1], (len(rows), units)).copy()
            nll = np.zeros(len(rows), np.float64)
            for t in range(steps):
                z = weights["embedding"][x[:, t]] @ weights["lstm_kernel"] + weights["lstm_bias"] \
                    + h @ weights["lstm_recurrent_kernel"]
                h, c = numpy_lm.cell(weights, z, c)
                nll += np.where(y[:, t] != PAD_ID, token_nll(numpy_lm.output_logits(weights, h), y[:, t]), 0.0)
            out[start : start + len(rows)] = nll / math.log(2)
        return out

    return score


def suggested_words(suggest: Callable[[str], list[str]], prefix: str, words: Sequence[str]) -> int:
    """How many of the secret's words the keyboard offers among its top 3 as each comes up, with
    the prefix and the secret's words before it typed."""
    return sum(word in suggest(" ".join([prefix, *words[:j]]))[:TOP_K] for j, word in enumerate(words))


class CanaryAudit:
    """Follows the published versions of one simulation and measures its canaries.

    `observe` is the fleet's per-version hook; `results` gives the report's `canaries` entries."""

    def __init__(self, canaries: Sequence[Canary], *, config: CanaryConfig, alphabet: Sequence[str], tokenizer):
        self.canaries, self.config, self.alphabet = list(canaries), config, tuple(alphabet)
        self.context = [BOS_ID, *tokenizer.encode(config.prefix)]
        self.word_pieces = [list(tokenizer.encode(w)) for w in self.alphabet]
        self._trained = {c.device: 0 for c in self.canaries}
        self._first_completed: dict[str, int] = {}
        self._final_hits = {c.device: 0 for c in self.canaries}
        self._weights = None
        self._version = None

    def secret_pieces(self, secret: Sequence[int]) -> list[int]:
        return [p for symbol in secret for p in self.word_pieces[symbol]]

    def observe(self, version: int, weights, model_dir: Path, trained: Iterable[str]) -> None:
        """A new published version, its weights, its downloaded folder, and the clients whose
        updates it aggregated."""
        from edge_runtime.suggest import Suggester

        for client in trained:
            if client in self._trained:
                self._trained[client] += 1
        suggester = Suggester(model_dir)
        for canary in self.canaries:
            hits = suggested_words(lambda text: suggester.suggest(text, TOP_K), self.config.prefix, canary.words)
            self._final_hits[canary.device] = hits
            if hits == len(canary.words):
                self._first_completed.setdefault(canary.device, version)
        self._weights, self._version = weights, version

    def exposures(self) -> list[Exposure]:
        if self._weights is None:
            raise RuntimeError("the audit has seen no model version")
        scorer = model_scorer(self._weights, self.context, self.word_pieces)
        total = space_size(len(self.alphabet), self.config.length)
        log.info("canaries: scoring %d of %d candidates under version %d", min(total, self.config.max_candidates),
                 total, self._version)
        return measure_exposures([c.secret for c in self.canaries], alphabet_size=len(self.alphabet),
                                 length=self.config.length, score=scorer, max_candidates=self.config.max_candidates,
                                 seed=self.config.seed)

    def results(self) -> list[dict]:
        """The report's `canaries` entries (docs/architecture.md)."""
        entries = []
        for canary, exposure in zip(self.canaries, self.exposures(), strict=True):
            entries.append({
                "phrase": canary.phrase, "device": canary.device, "repeats": canary.repeats,
                "trained_rounds": self._trained[canary.device],
                "exposure": round(exposure.exposure, 3), "rank": exposure.rank, "candidates": exposure.candidates,
                "rank_method": exposure.method, "scored": exposure.scored,
                "log_perplexity_bits": round(exposure.log_perplexity, 3),
                "model_version": self._version,
                "top3_words": self._final_hits[canary.device],
                "top3_completed": canary.device in self._first_completed,
                "top3_first_version": self._first_completed.get(canary.device),
            })
        return entries

    def config_json(self) -> dict:
        return {**dataclasses.asdict(self.config), "alphabet": list(self.alphabet)}


def exposure_by_repeats(entries: Sequence[dict]) -> dict[str, float]:
    """Mean exposure of the canaries typed each number of times, by that number (as a string key)."""
    by: dict[int, list[float]] = {}
    for entry in entries:
        by.setdefault(entry["repeats"], []).append(entry["exposure"])
    return {str(r): round(float(np.mean(v)), 3) for r, v in sorted(by.items())}


def summary_line(entries: Sequence[dict]) -> str:
    """One line for the command's output."""
    means = ", ".join(f"{r}x {e:.1f}" for r, e in exposure_by_repeats(entries).items())
    completed = sum(e["top3_completed"] for e in entries)
    return (f"canaries: mean exposure by repeats {means} bits (at most {math.log2(entries[0]['candidates']):.1f}, "
            f"{entries[0]['candidates']} candidates); top-3 completed {completed} of {len(entries)}")
