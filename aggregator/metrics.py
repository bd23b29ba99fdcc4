"""Prometheus metrics in a per-app registry.

Counts that must agree across gunicorn workers (rounds, accepted and rejected updates, bytes,
model version, aggregation and publishing time) are read from SQLite at scrape time by a custom
collector, so every worker reports the same totals without prometheus-client's multiprocess
mode. Request latency is per process (a plain Histogram), which is what a latency histogram of a
worker should be anyway.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from aggregator import db
from aggregator.privacy import privacy_spent

_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class _StateCollector:
    """Reads the server's durable counters from SQLite on every scrape."""

    def __init__(self, state_dir, config=None):
        self.state_dir = state_dir
        self.config = config

    def describe(self):
        return []  # do not scrape at registration time

    def collect(self):
        conn = db.connect(self.state_dir)
        try:
            totals = db.totals(conn)
            rejected = db.rejections(conn)
            active = db.active_round(conn)
            version = db.latest_version(conn)
            finished = conn.execute("SELECT aggregate_seconds, publish_seconds FROM rounds WHERE state = 'closed'").fetchall()
            spent = privacy_spent(conn, self.config) if self.config is not None else None
        finally:
            conn.close()

        rounds = CounterMetricFamily("fedkb_rounds", "Finished rounds, by outcome", labels=["outcome"])
        for outcome in ("closed", "abandoned"):
            rounds.add_metric([outcome], totals["rounds"].get(outcome, 0))
        yield rounds
        yield CounterMetricFamily("fedkb_updates_accepted", "Updates accepted", value=totals["accepted"])
        rej = CounterMetricFamily("fedkb_updates_rejected", "Updates rejected, by reason", labels=["reason"])
        for reason, count in sorted(rejected.items()):
            rej.add_metric([reason], count)
        yield rej
        yield CounterMetricFamily("fedkb_bytes_received", "Update bytes received (accepted and rejected)",
                                  value=totals["bytes_received"])
        yield GaugeMetricFamily("fedkb_devices", "Enrolled devices", value=totals["devices"])
        yield GaugeMetricFamily("fedkb_model_version", "Latest published model version", value=version or 0)
        if active is not None:
            yield GaugeMetricFamily("fedkb_round_id", "Id of the active round", value=active.id)
            yield GaugeMetricFamily("fedkb_round_accepted_updates", "Updates accepted in the active round",
                                    value=active.accepted)
            yield GaugeMetricFamily("fedkb_round_assigned_devices", "Tasks handed out in the active round",
                                    value=active.assigned)
        for name, column, help_ in (("fedkb_aggregation_seconds", 0, "Time folding and averaging a round's updates"),
                                    ("fedkb_publish_seconds", 1, "Time from round close to the new version published")):
            values = [r[column] for r in finished if r[column] is not None]
            yield _histogram(name, help_, values)
        if spent is not None:  # +Inf when nothing bounds it (a round released without noise, Z = 0)
            yield GaugeMetricFamily("fedkb_privacy_epsilon", "Epsilon spent so far at fedkb_privacy_delta, "
                                    "assuming Poisson sampling of devices (see /v1/status privacy.spent.sampling)",
                                    value=spent.epsilon)
            yield GaugeMetricFamily("fedkb_privacy_epsilon_without_amplification",
                                    "Epsilon spent so far without amplification by sampling",
                                    value=spent.epsilon_without_amplification)
            yield GaugeMetricFamily("fedkb_privacy_delta", "The delta of the epsilon figures", value=spent.delta)


def _histogram(name: str, help_: str, values: list[float]) -> HistogramMetricFamily:
    buckets, acc = [], 0
    for bound in _SECONDS_BUCKETS:
        acc = sum(1 for v in values if v <= bound)
        buckets.append((repr(bound), acc))
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, help_, buckets=buckets, sum_value=float(sum(values)))


class Metrics:
    """The app's registry: durable counters from SQLite plus this process's request latency."""

    def __init__(self, state_dir, config=None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StateCollector(state_dir, config))
        self.request_seconds = Histogram("fedkb_request_seconds", "Request latency in this process",
                                         ["endpoint"], registry=self.registry,
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
