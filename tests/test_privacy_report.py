"""`fedkb simulate` with DP: report.json carries the server's ε after every round, and a target ε
ends the run at the round count an independent dp_accounting computation allows."""

from __future__ import annotations

import json

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant

from tests.conftest import write_jsonl
from tests.fixtures_model import assert_seeded_model_used, seed_initial_model
from tests.fixtures_model import tiny_config, tiny_data, tiny_model  # noqa: F401  (the session fixtures)
from tests.test_simulation_fleet import TINY_FLAGS, _simulate

CLIENTS, PER_ROUND, Z = 8, 3, 1.5


def _epsilon(rounds: int) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(PER_ROUND / CLIENTS, dp_accounting.GaussianDpEvent(Z)), rounds))
    return accountant.get_epsilon(CLIENTS ** -1.1)  # simulate's population is its fleet


def test_report_has_epsilon_after_every_round_and_the_target_ends_the_run(tiny_model, tmp_path):
    corpus = write_jsonl(tmp_path / "users.jsonl", clients=12, lines_per_client=10)
    out = tmp_path / "run"
    # tiny_model is the export of TINY_FLAGS with the tokenizer this run trains on this corpus (the
    # run checks that it is: a model of another tokenizer stops it).
    seeded = seed_initial_model(out, tiny_model)
    target = (_epsilon(2) + _epsilon(3)) / 2
    result = _simulate(["simulate", "--dataset", f"jsonl:{corpus}", "--out", str(out), "--clients", str(CLIENTS),
                        "--clients-per-round", str(PER_ROUND), "--rounds", "4", "--workers", "1",
                        "--round-hours", "0.5", "--dp-noise-multiplier", str(Z), "--target-epsilon", str(target),
                        *TINY_FLAGS], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert_seeded_model_used(report, seeded)
    rounds = report["rounds"]
    assert rounds[0]["privacy"] is None  # the initial model: nothing released yet
    for r in rounds[1:]:
        released = r["model_version"] - rounds[0]["model_version"]
        privacy = r["privacy"]
        assert privacy["rounds"] == released and abs(privacy["epsilon"] - _epsilon(released)) < 1e-9 * _epsilon(
            max(1, released)), (r, _epsilon(released))
        assert privacy["delta"] == CLIENTS ** -1.1 and privacy["noise_multiplier"] == Z
        assert privacy["mechanism"] == "dp-fedavg" and f"q = {PER_ROUND}/{CLIENTS}" in privacy["sampling"]
        assert privacy["epsilon"] <= target < privacy["epsilon_without_amplification"]
    assert report["summary"]["privacy"] == rounds[-1]["privacy"]
    # Two releases fit under the target (the fleet's seeded availability closes rounds 1 and 2):
    # after the second no round opens, and the run ends before its 4 rounds, saying why.
    assert rounds[-1]["model_version"] - rounds[0]["model_version"] == 2 and len(rounds) - 1 == 2
    assert "privacy budget spent" in result.stderr
