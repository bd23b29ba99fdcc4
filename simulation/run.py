"""The whole simulation job: data → initial model → fleet (or TFF) → report.json + plot."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from datasets.prepared import load_prepared
from fedkb_core.errors import FedkbError
from fedkb_core.durable import ensure_writable_folder
from model.config import ModelConfig
from simulation.canaries import CanaryConfig, exposure_by_repeats, measured, plant_canaries, unmeasured_warning
from simulation.fleet import FleetConfig, draw_clients
from simulation.report import plot_report, report_dict, write_report

log = logging.getLogger(__name__)


def ensure_data(dataset: str, data_dir: Path | None, out: Path, vocab_size: int):
    """Reuse a prepared folder, or prepare `dataset` into out/data."""
    if data_dir is not None:
        return load_prepared(data_dir)
    target = out / "data"
    if (target / "stats.json").exists():
        try:
            data = load_prepared(target)
            if data.stats.get("dataset") == dataset:
                return data
        except FedkbError:
            pass
    from datasets.prepare import PrepareConfig, prepare_dataset

    prepare_dataset(PrepareConfig(dataset=dataset, vocab_size=vocab_size), target)
    return load_prepared(target)


def simulate(*, dataset: str, out: Path, fleet: FleetConfig, model: ModelConfig | None = None,
             data_dir: Path | None = None, backend: str = "fedkb", baseline: Path | None = None,
             vocab_size: int = 8000, progress: bool | None = None, canaries: CanaryConfig | None = None) -> dict:
    """Run one simulation and write its report; return the report dict.

    With `canaries` (a count above 0), the memorization audit: its canaries are planted in the
    training text of that many of the fleet's devices, measured on the published versions and
    reported under `canaries` (`simulation.canaries`).
    """
    out = Path(out)
    ensure_writable_folder(out)
    started = time.monotonic()
    data = ensure_data(dataset, data_dir, out, vocab_size)
    fleet.validate(len(data.train))
    audit = None
    if canaries is not None and canaries.count:
        if backend != "fedkb":
            raise FedkbError("--canaries needs --backend fedkb: the audit measures the versions the server publishes")
        fleet_clients = draw_clients(np.random.default_rng(fleet.seed), data.train, fleet.clients)
        data, audit = plant_canaries(data, canaries, fleet_clients)
    model = model or ModelConfig(vocab_size=data.vocab_size)
    if model.vocab_size != data.vocab_size:
        model = dataclasses.replace(model, vocab_size=data.vocab_size)
    baseline_metrics = None
    if baseline is not None:
        path = Path(baseline) / "metrics.json" if Path(baseline).is_dir() else Path(baseline)
        if not path.is_file():
            raise FedkbError(f"{path}: no baseline metrics.json")
        baseline_metrics = json.loads(path.read_text())["heldout"]

    if backend == "fedkb":
        from export.pipeline import export_model
        from simulation.fleet import run_fleet

        model_dir = out / "initial_model"
        if not (model_dir / "manifest.json").exists():
            log.info("exporting the initial model (%d parameters)", model.num_parameters)
            export_model(tokenizer_path=data.tokenizer_path, out_dir=model_dir, config=model)
        import shutil

        # A simulation starts from a fresh server, and from devices without model versions: the
        # new server numbers its versions from 1 again, so a cached "version 2" would be stale.
        for stale in (out / "server", out / "device_cache"):
            if stale.exists():
                shutil.rmtree(stale)
        records = run_fleet(data=data, model_dir=model_dir, out=out, config=fleet, progress=progress,
                            observe=audit.observe if audit else None)
    elif backend == "tff":
        from simulation.tff_backend import run_tff

        records = run_tff(data=data, model=model, config=fleet, progress=progress)
    else:
        raise FedkbError(f"unknown backend {backend!r}; expected fedkb or tff")

    first, last = records[0].eval, records[-1].eval
    summary = {
        "backend": backend,
        "rounds": len(records) - 1,
        "seconds": round(time.monotonic() - started, 1),
        "seconds_per_round": round(sum(r.seconds for r in records[1:]) / max(1, len(records) - 1), 2),
        "word_perplexity_before": first.word_perplexity,
        "word_perplexity_after": last.word_perplexity,
        "top1_before": first.top1,
        "top1_after": last.top1,
        "final_model_version": records[-1].model_version,
        "privacy": records[-1].privacy,  # the server's account after the last round (null without DP)
    }
    canary_entries = audit.results() if audit else []
    if canary_entries:
        summary["canary_exposure_by_repeats"] = exposure_by_repeats(canary_entries)
        summary["canaries_top3_completed"] = sum(e["top3_completed"] for e in canary_entries)
        summary["canaries_unmeasured"] = sum(not measured(e) for e in canary_entries)
        warning = unmeasured_warning(canary_entries)
        if warning:
            log.warning("canaries: %s", warning)
    if baseline_metrics:
        summary["top1_fraction_of_baseline"] = last.top1 / baseline_metrics["top1"] if baseline_metrics["top1"] else None
    config = {"dataset": dataset, "backend": backend, "model": model.to_json(),
              "fleet": json.loads(json.dumps(dataclasses.asdict(fleet), default=str))}
    if audit:
        config["canaries"] = audit.config_json()
    report = report_dict(config=config, rounds=records, baseline=baseline_metrics, summary=summary,
                         canaries=canary_entries)
    write_report(out, report)
    plot_report(out / "report.png", {backend: report}, baseline=baseline_metrics,
                title=f"{dataset}: {fleet.clients} devices, {fleet.clients_per_round} per round")
    return report
