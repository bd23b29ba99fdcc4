"""report.json and its plot: what a simulation measured, round by round.

Keys follow docs/architecture.md: a `rounds` list whose entries have `round`, `model_version`, `clients`
and `eval` {token_perplexity, word_perplexity, top1, top3}, plus participation and bytes; a
`canaries` list, one entry per planted canary (empty without `--canaries`).
Round 0 is the initial model, evaluated before any training. With differential privacy on, each
round's `privacy` is the server's account after it (`/v1/admin/status` → `privacy.spent`: epsilon,
delta, noise_multiplier, clip_norm, mechanism, accountant, sampling, epsilon_without_amplification,
rounds; fedkb_core/privacy_accounting.py), and null without DP. With secure aggregation, each
round's `secagg` counts the phones at every stage and their CPU time (`simulation.secagg_round`),
and is null without it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedkb_core.durable import atomic_write_json
from model.metrics import EvalResult  # noqa: F401  (re-exported: the report's eval entries)

EVAL_KEYS = ("token_perplexity", "word_perplexity", "top1", "top3")


@dataclasses.dataclass(frozen=True)
class Participation:
    """Who could, was asked to, and did take part in a round."""

    eligible: int = 0
    selected: int = 0
    completed: int = 0
    dropped: int = 0  # stopped mid-job because a condition stopped holding, or failed
    late: int = 0  # over-selected: finished after the round had reached its goal
    rejected: int = 0  # refused by the server's validation


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    round: int
    model_version: int
    clients: int  # updates aggregated into this round's model
    eval: EvalResult  # held-out clients
    eval_participants: EvalResult | None = None  # test splits of clients that trained
    participation: Participation = dataclasses.field(default_factory=Participation)
    bytes_uploaded: int = 0  # request body bytes the phones sent this round (updates, retries, check-ins)
    bytes_downloaded: int = 0  # response body bytes the phones read this round (models, manifests, answers)
    traffic: dict = dataclasses.field(default_factory=lambda: traffic_summary([]))  # per device: `traffic_summary`
    seconds: float = 0.0
    sim_time: float = 0.0  # simulated UTC seconds when the round closed
    examples: int = 0  # training windows behind the updates aggregated into this round's model
    steps: int = 0  # training steps (batches) behind them
    privacy: dict | None = None  # the server's privacy account after this round (`PrivacySpent.as_json`)
    secagg: dict | None = None  # secure aggregation: the round's stage counts and CPU (simulation.secagg_round)


def traffic_summary(moved: list[tuple[int, int, int]]) -> dict:
    """A round's HTTP traffic from each phone's (requests, bytes sent, bytes received), as its
    client counted them: `devices` (phones that sent a request), `requests`, and
    `bytes_uploaded` / `bytes_downloaded` as {total, mean, max} over those phones."""
    moved = [m for m in moved if m[0] > 0]

    def stats(values: list[int]) -> dict:
        return {"total": sum(values), "mean": round(sum(values) / len(values), 1) if values else 0.0,
                "max": max(values, default=0)}

    return {"devices": len(moved), "requests": sum(m[0] for m in moved),
            "bytes_uploaded": stats([m[1] for m in moved]), "bytes_downloaded": stats([m[2] for m in moved])}


def report_dict(*, config: dict, rounds: list[RoundRecord], baseline: dict | None = None,
                summary: dict | None = None, canaries: list[dict] | None = None) -> dict:
    return {
        "config": config,
        "rounds": [dataclasses.asdict(r) for r in rounds],
        "baseline": baseline,
        "summary": summary or {},
        "canaries": canaries or [],  # the memorization audit's (simulation.canaries), if one ran
    }


def write_report(out: Path, report: dict) -> Path:
    """Write report.json atomically."""
    return atomic_write_json(Path(out) / "report.json", report)


def plot_report(out_png: Path, series: dict[str, dict], *, baseline: dict | None = None,
                title: str = "fedkb federated training") -> Path:
    """Plot the four eval curves for one or more reports (e.g. fedkb and the TFF reference).

    Args:
        series: label -> report dict (as written by `write_report`).
        baseline: the centralized baseline's held-out metrics, drawn as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    labels = {"word_perplexity": "word perplexity (held-out)", "token_perplexity": "token perplexity (held-out)",
              "top1": "top-1 next-word recall", "top3": "top-3 next-word recall"}
    for ax, key in zip(axes.ravel(), ("word_perplexity", "token_perplexity", "top1", "top3"), strict=True):
        for name, report in series.items():
            rounds = [r["round"] for r in report["rounds"]]
            ax.plot(rounds, [r["eval"][key] for r in report["rounds"]], marker="o", markersize=3, label=name)
        if baseline and key in baseline:
            ax.axhline(baseline[key], linestyle="--", color="grey", label="centralized baseline")
        ax.set_title(labels[key])
        ax.grid(alpha=0.3)
        if "perplexity" in key:
            ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("round")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
