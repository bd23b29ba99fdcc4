"""`fedkb simulate --canaries` end to end on the tiny data: a real server, the emulated phones'
LiteRT training, the LiteRT keyboard's suggestions on every published version.

What the tiny run shows robustly (measured over fleet seeds 0-3 at 30 rounds: every canary typed
16 times had 5.4-10.4 bits of exposure and was completed by the top 3; every canary typed once
had 1.0-3.7 bits): canaries typed 16 times are exposed more than canaries typed once, and the
keyboard completes them. Canaries typed once are not asserted to stay hidden: with four canaries
behind one prefix, the model learns which digits follow it from all of them.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import simulation.fleet
from datasets.prepared import load_prepared
from datasets.tokenizer import BOS_ID, EOS_ID, load_tokenizer
from datasets.windows import make_windows
from model.config import ModelConfig
from model.evaluation import EvalConfig
from simulation.availability import AvailabilityConfig
from simulation.canaries import CanaryConfig
from simulation.fleet import FleetConfig
from simulation.run import simulate
from tests.fixtures_model import TINY, assert_seeded_model_used, seed_initial_model
from tests.fixtures_model import tiny_config, tiny_data, tiny_model  # noqa: F401  (the session fixtures)
from tests.test_simulation_fleet import ALWAYS_NIGHT, TINY_FLAGS, _simulate

ENTRY_KEYS = {"phrase", "device", "repeats", "trained_rounds", "exposure", "rank", "candidates", "rank_method",
              "scored", "log_perplexity_bits", "model_version", "top3_words", "top3_completed", "top3_first_version",
              "device_windows", "trained_canary_windows", "trained_whole_occurrences"}


def _without(tokens: np.ndarray, utterance: list[int]) -> tuple[list[int], int]:
    """The tokens with every occurrence of `utterance` cut out, and how many there were."""
    tokens, rest, count, i = tokens.tolist(), [], 0, 0
    while i < len(tokens):
        if tokens[i : i + len(utterance)] == utterance:
            count, i = count + 1, i + len(utterance)
        else:
            rest.append(tokens[i])
            i += 1
    return rest, count


def _occurrences(tokens: np.ndarray, utterance: list[int]) -> int:
    return _without(tokens, utterance)[1]


def test_canaries_typed_more_often_are_exposed_more_and_reach_only_their_devices_training(
        tiny_data, tiny_model, tmp_path, monkeypatch):
    data = load_prepared(tiny_data)
    seeded = seed_initial_model(tmp_path / "run", tiny_model)  # this run's own export, already made
    jobs, evaluated = [], []
    real_job, real_evaluate = simulation.fleet.run_device_job, simulation.fleet.evaluate_weights

    def job_spy(job):  # workers=1: the jobs run in this process
        jobs.append(job.tokens)
        return real_job(job)

    def evaluate_spy(weights, streams, *args, **kwargs):
        evaluated.append(streams)
        return real_evaluate(weights, streams, *args, **kwargs)

    monkeypatch.setattr(simulation.fleet, "run_device_job", job_spy)
    monkeypatch.setattr(simulation.fleet, "evaluate_weights", evaluate_spy)
    # Server FedAvg at learning rate 1, a clip the tiny model's updates stay under, three local epochs:
    # enough training in 30 rounds of four devices to memorize.
    fleet = FleetConfig(clients=4, clients_per_round=4, min_clients=4, over_selection=1.0, rounds=30, workers=1,
                        max_examples=64, device_epochs=3, device_lr=1.0, clip_norm=100.0, server_optimizer="sgd",
                        server_lr=1.0, job_minutes=0.0, seed=0, eval=EvalConfig(seq_len=6, max_windows=32,
                                                                                recall_samples=10),
                        availability=AvailabilityConfig(**ALWAYS_NIGHT))
    canaries = CanaryConfig(count=4, repeats=(1, 16), alphabet=tuple("01234567"), length=4, seed=0)
    report = simulate(dataset="tiny", data_dir=tiny_data, out=tmp_path / "run", fleet=fleet,
                      model=ModelConfig(vocab_size=data.vocab_size, **TINY), canaries=canaries, progress=False)

    assert_seeded_model_used(report, seeded)
    entries = report["canaries"]
    assert len(entries) == 4 and all(set(e) == ENTRY_KEYS for e in entries)
    assert [e["repeats"] for e in entries] == [1, 16, 1, 16]
    assert all(e["candidates"] == 8**4 - 3 and e["rank_method"] == "exact" for e in entries)
    final = report["summary"]["final_model_version"]
    assert all(e["model_version"] == final and e["trained_rounds"] == final - 1 for e in entries)
    # A device with at most max_examples windows trains on all of them, its canary's every round; one
    # with more (16 canaries make 96) on a sample, which held some of its canary every round here.
    assert report["summary"]["canaries_unmeasured"] == 0
    assert all(e["trained_canary_windows"] >= e["trained_rounds"] for e in entries)
    assert all(e["trained_canary_windows"] % e["trained_rounds"] == 0 for e in entries
               if e["device_windows"] <= fleet.max_examples)
    assert any(e["device_windows"] > fleet.max_examples for e in entries)

    # Planted into the chosen devices' training text only, as whole utterances, `repeats` times.
    tokenizer = load_tokenizer(data.tokenizer_path)
    utterances = {e["device"]: [BOS_ID, *tokenizer.encode(e["phrase"]), EOS_ID] for e in entries}
    trained = set()
    for tokens in jobs:
        carried = [device for device, utterance in utterances.items() if _occurrences(tokens, utterance)]
        if not carried:  # an unplanted device's own text
            assert any(np.array_equal(tokens, data.train[c]) for c in data.train if c not in utterances)
            continue
        (device,) = carried  # one canary per device
        entry = next(e for e in entries if e["device"] == device)
        rest, count = _without(tokens, utterances[device])
        assert entry["device_windows"] == len(make_windows(tokens, report["config"]["model"]["seq_len"]))
        assert count == entry["repeats"] and rest == data.train[device].tolist()
        trained.add(device)
    assert trained == set(utterances)
    assert evaluated
    for streams in evaluated:  # the held-out clients and the fleet's test splits, as prepared
        for client, stream in streams.items():
            assert np.array_equal(stream, data.heldout[client] if client in data.heldout else data.test[client])
            assert not any(_occurrences(stream, u) for u in utterances.values())

    # Memorized with repetition.
    once = [e["exposure"] for e in entries if e["repeats"] == 1]
    often = [e["exposure"] for e in entries if e["repeats"] == 16]
    assert min(often) > max(once), entries
    assert np.mean(often) - np.mean(once) >= 3.0, entries
    assert all(e["top3_completed"] and e["top3_first_version"] <= final for e in entries if e["repeats"] == 16)
    assert report["summary"]["canary_exposure_by_repeats"] == pytest.approx({"1": np.mean(once), "16": np.mean(often)},
                                                                          abs=1e-3)
    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert written["canaries"] == entries and written["config"]["canaries"]["alphabet"] == list("01234567")


def test_simulate_prints_the_canary_summary_and_reports_every_canary_with_dp_on_as_well(tiny_data, tiny_model,
                                                                                        tmp_path):
    out = tmp_path / "run"  # the audit is independent of the --dp-* settings
    seeded = seed_initial_model(out, tiny_model)  # what TINY_FLAGS on tiny_data export
    result = _simulate(["simulate", "--data", str(tiny_data), "--out", str(out), "--clients", "4",
                        "--clients-per-round", "2", "--rounds", "2", "--workers", "1", "--round-hours", "0.5",
                        "--canaries", "3", "--canary-repeats", "2,5", "--canary-alphabet", "0,1,2,3,4,5,6,7",
                        "--canary-length", "3", "--dp-noise-multiplier", "0.5", *TINY_FLAGS], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert_seeded_model_used(report, seeded)
    entries = report["canaries"]
    assert [e["repeats"] for e in entries] == [2, 5, 2] and all(set(e) == ENTRY_KEYS for e in entries)
    assert len({e["device"] for e in entries}) == 3
    for e in entries:
        assert re.fullmatch(r"my pin is [0-7] [0-7] [0-7]", e["phrase"]) and e["candidates"] == 8**3 - 2
        assert 1 <= e["rank"] <= e["candidates"] and 0 <= e["exposure"] <= np.log2(e["candidates"]) + 1e-9
        assert isinstance(e["top3_completed"], bool) and 0 <= e["top3_words"] <= 3
    assert report["config"]["canaries"]["repeats"] == [2, 5] and report["config"]["canaries"]["seed"] == 0
    assert report["config"]["fleet"]["dp_noise_multiplier"] == 0.5
    line = re.search(r"^canaries: mean exposure by repeats 2x (\d+\.\d|—), 5x (\d+\.\d|—) bits \(at most 9\.0, 510 "
                     r"candidates\); top-3 completed \d of 3$", result.stdout, re.M)
    assert line, result.stdout
    # Two rounds of two of four devices: a canary device may not have trained, and is said to measure nothing.
    unmeasured = [e for e in entries if e["trained_canary_windows"] == 0]
    assert all(e["trained_canary_windows"] > 0 for e in entries if e["trained_whole_occurrences"] > 0)
    assert report["summary"]["canaries_unmeasured"] == len(unmeasured)
    warning = re.search(r"^WARNING: .* their exposure measures nothing and is left out of the means", result.stdout,
                        re.M)
    assert bool(warning) == bool(unmeasured), result.stdout
    for e in unmeasured:
        assert repr(e["phrase"]) in warning.group(0)


@pytest.mark.parametrize("args, message", [
    (["--canaries", "-1"], "--canaries must not be negative, got -1"),
    (["--canaries", "2", "--canary-repeats", "1,0"], "--canary-repeats must be one or more counts of at least 1"),
    (["--canaries", "2", "--canary-length", "0"], "--canary-length must be at least 1, got 0"),
    (["--canaries", "2", "--backend", "tff"], "--canaries needs --backend fedkb"),
    (["--canaries", "5", "--clients", "4", "--clients-per-round", "2", "--canary-alphabet", "digits"],
     "the tokenizer encodes 8, 9 as <unk>"),
    (["--canaries", "5", "--clients", "4", "--clients-per-round", "2", "--canary-alphabet", "0,1,2"],
     "--canaries 5 needs as many emulated devices; --clients is 4"),
    (["--canaries", "2", "--canary-alphabet", "zz,qq"], "--canary-alphabet: the tokenizer encodes zz as <unk>"),
])
def test_bad_canary_settings_fail_at_start_with_one_line(args, message, tiny_data, tmp_path):
    out = tmp_path / "out"
    result = _simulate(["simulate", "--data", str(tiny_data), "--out", str(out), "--clients", "4",
                        "--clients-per-round", "2", *args], tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fedkb simulate: error:") and message in last and "Traceback" not in result.stderr, \
        result.stderr
    assert not (out / "initial_model").exists() and not (out / "report.json").exists()  # nothing was trained


def test_canary_repeats_must_be_counts(tmp_path):
    result = _simulate(["simulate", "--out", str(tmp_path / "out"), "--canaries", "2", "--canary-repeats", "1,x"],
                       tmp_path, timeout=120)
    assert result.returncode == 2 and "expected comma-separated counts such as 1,4,16, got '1,x'" in result.stderr
