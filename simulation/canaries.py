"""A memorization audit: canary phrases planted in chosen devices' text (`fedkb simulate --canaries`).

After Carlini et al., 2019 ("The Secret Sharer") and Thakkar et al., 2020 ("Understanding
Unintended Memorization in Federated Learning"): K random phrases, a fixed prefix and L secret
words drawn from an alphabet with a seeded generator ("my pin is 4 1 9 7"), are typed on K of
the fleet's devices, canary k `repeats[k mod len(repeats)]` times, each time as one more utterance
at a random place between that device's utterances. The planted utterances are tokenized with
the data's tokenizer as `fedkb data prepare` tokenizes real text (`encode_utterances`), into the
device's training stream only: its test split and the held-out clients are never touched, and the
emulated phone cuts them into windows like the rest of its text.

The devices are drawn uniformly from the fleet, as any user could be: not the devices that train
most (that would overstate what a typical user's phrase risks) nor those with the least text. A
device's daily pattern may keep it from ever training in a short run, and a device with more than
the task's `max_examples` windows trains on a sample of them, which may miss its canary: the audit
counts, per canary, the rounds its device trained, the trained windows that held the canary and
the occurrences trained whole (prefix and secret in one window), and warns of every canary whose
exposure therefore measures nothing. Size the run so that every canary device trains several times.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from datasets.prepared import PreparedData
from datasets.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, encode_utterances
from edge_runtime.trainer import sample_window_indices
from fedkb_core.manifest import load_manifest
from fedkb_core.protocol import RoundTask
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
    train = plant(data.train, canaries, tokenizer, seed=config.seed)
    audit = CanaryAudit(canaries, config=config, alphabet=alphabet, tokenizer=tokenizer,
                        streams={c.device: train[c.device] for c in canaries})
    for canary in canaries:
        if not np.array_equal(tokenizer.encode(canary.phrase), audit.context[1:] + audit.secret_pieces(canary.secret)):
            raise FedkbError(f"the tokenizer encodes {canary.phrase!r} other than its words one by one")
    log.info("planted %d canaries (%s) in %d devices' training text", len(canaries),
             ", ".join(f"{c.repeats}x" for c in canaries), len(canaries))
    return dataclasses.replace(data, train=train), audit


def occurrence_starts(stream: np.ndarray, utterance: np.ndarray) -> np.ndarray:
    """Where the planted utterance begins in a stream (token offsets of its BOS)."""
    stream, n = np.asarray(stream), len(utterance)
    candidates = np.flatnonzero(stream[: len(stream) - n + 1] == utterance[0]) if len(stream) >= n else []
    return np.array([s for s in candidates if np.array_equal(stream[s : s + n], utterance)], dtype=np.int64)


def canary_windows(starts: np.ndarray, length: int, seq_len: int) -> tuple[set[int], set[int]]:
    """The windows (`datasets.windows.make_windows` of the stream) an occurrence's targets fall in:
    those holding any of them, and those holding a whole occurrence.

    Window i predicts tokens i·T+1 … (i+1)·T from the ones before, with a fresh LSTM state. An
    occurrence at s predicts tokens s+1 … s+length−1 after its BOS; it is trained *whole* (the
    secret learnt after the prefix, in one context) only if all of them fall in one window."""
    touched, whole = set(), set()
    for s in starts:
        first, last = int(s) // seq_len, (int(s) + length - 2) // seq_len
        touched.update(range(first, last + 1))
        if first == last:
            whole.add(first)
    return touched, whole


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

    def __init__(self, canaries: Sequence[Canary], *, config: CanaryConfig, alphabet: Sequence[str], tokenizer,
                 streams: Mapping[str, np.ndarray]):
        """`streams`: each canary device's training stream, as planted."""
        self.canaries, self.config, self.alphabet = list(canaries), config, tuple(alphabet)
        self.context = [BOS_ID, *tokenizer.encode(config.prefix)]
        self.word_pieces = [list(tokenizer.encode(w)) for w in self.alphabet]
        self._trained = {c.device: 0 for c in self.canaries}
        self._stream_lengths = {c.device: len(streams[c.device]) for c in self.canaries}
        self._starts = {c.device: occurrence_starts(streams[c.device], canary_utterance(tokenizer, c))
                        for c in self.canaries}
        self._utterance_length = {c.device: len(canary_utterance(tokenizer, c)) for c in self.canaries}
        self._seq_len: int | None = None
        # summed over the rounds a device's update was aggregated in: windows trained that held
        # (part of) its canary, and occurrences trained whole in one window
        self._canary_windows = {c.device: 0 for c in self.canaries}
        self._whole = {c.device: 0 for c in self.canaries}
        self._first_completed: dict[str, int] = {}
        self._final_hits = {c.device: 0 for c in self.canaries}
        self._weights = None
        self._version = None

    def secret_pieces(self, secret: Sequence[int]) -> list[int]:
        return [p for symbol in secret for p in self.word_pieces[symbol]]

    def observe(self, version: int, weights, model_dir: Path, trained: Mapping[str, object]) -> None:
        """A new published version, its weights, its downloaded folder, and the clients whose
        updates it aggregated, each with the job it ran (`simulation.device_job.DeviceJob`: its
        token stream, task and training seed, from which the windows it trained on follow)."""
        from edge_runtime.suggest import Suggester

        self.record_training(trained, seq_len=load_manifest(model_dir).seq_len)
        suggester = Suggester(model_dir)
        for canary in self.canaries:
            hits = suggested_words(lambda text: suggester.suggest(text, TOP_K), self.config.prefix, canary.words)
            self._final_hits[canary.device] = hits
            if hits == len(canary.words):
                self._first_completed.setdefault(canary.device, version)
        self._weights, self._version = weights, version

    def device_windows(self, client: str) -> int:
        """The training windows of the device's stream (`datasets.windows.make_windows`'s count)."""
        return max(0, -(-(self._stream_lengths[client] - 1) // self._seq_len))

    def record_training(self, trained: Mapping[str, object], *, seq_len: int) -> None:
        """Count an aggregated round's training of the canary devices among `trained` (client ->
        its job: `task` as JSON and the training `seed`): the round, and the windows the job trained
        on that held the canary, which the device sampled with `sample_window_indices` and that seed."""
        self._seq_len = seq_len
        for client, job in trained.items():
            if client not in self._trained:
                continue
            self._trained[client] += 1
            touched, whole = canary_windows(self._starts[client], self._utterance_length[client], seq_len)
            task = RoundTask.from_json(job.task)
            chosen = set(sample_window_indices(self.device_windows(client), task.max_examples,
                                               seed=job.seed).tolist())
            self._canary_windows[client] += len(touched & chosen)
            self._whole[client] += len(whole & chosen)

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
                "device_windows": self.device_windows(canary.device),
                "trained_canary_windows": self._canary_windows[canary.device],
                "trained_whole_occurrences": self._whole[canary.device],
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


def measured(entry: dict) -> bool:
    """Whether the canary's exposure measures anything: an aggregated update of its device trained
    on a window holding (part of) it. Otherwise the model never saw it, and its exposure is that
    of a phrase never typed, whatever the mechanism. (An occurrence split across two windows is
    trained as two fragments, as a real message would be: it counts as seen.)"""
    return entry["trained_canary_windows"] > 0


def exposure_by_repeats(entries: Sequence[dict]) -> dict[str, float | None]:
    """Mean exposure of the *measured* canaries typed each number of times, by that number (as a
    string key; None when none of them was measured). A canary the model never trained on would
    pull the mean towards "nothing memorized" and make the model look more private than it is."""
    by: dict[int, list[float]] = {}
    for entry in entries:
        by.setdefault(entry["repeats"], [])
        if measured(entry):
            by[entry["repeats"]].append(entry["exposure"])
    return {str(r): round(float(np.mean(v)), 3) if v else None for r, v in sorted(by.items())}


def unmeasured_warning(entries: Sequence[dict]) -> str | None:
    """What the audit could not measure, in one sentence (None when every canary was trained on)."""
    never = [e for e in entries if e["trained_rounds"] == 0]
    missed = [e for e in entries if e["trained_rounds"] > 0 and not measured(e)]
    if not never and not missed:
        return None
    parts = []
    if never:
        parts.append(f"{len(never)} of {len(entries)} canary devices never trained "
                     f"({', '.join(repr(e['phrase']) for e in never)})")
    if missed:
        parts.append(f"{len(missed)} trained but never on a window holding their canary "
                     f"({', '.join(repr(e['phrase']) for e in missed)})")
    return ("WARNING: " + "; ".join(parts) + ": their exposure measures nothing and is left out of the means; "
            "run more rounds or a smaller fleet")


def summary_line(entries: Sequence[dict]) -> str:
    """One line for the command's output (and the warning, if any canary was not measured)."""
    means = ", ".join(f"{r}x {'—' if e is None else f'{e:.1f}'}" for r, e in exposure_by_repeats(entries).items())
    completed = sum(e["top3_completed"] for e in entries)
    line = (f"canaries: mean exposure by repeats {means} bits (at most {math.log2(entries[0]['candidates']):.1f}, "
            f"{entries[0]['candidates']} candidates); top-3 completed {completed} of {len(entries)}")
    warning = unmeasured_warning(entries)
    return line if warning is None else f"{line}\n{warning}"
