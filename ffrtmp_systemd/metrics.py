"""The Prometheus exposition of /metrics: the counters and the live gauges as text. Formatting ONLY.

The only prometheus_client import: the exporter loads this module at its first scrape, in a worker
thread, so a host that is never scraped never loads prometheus_client.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from .counters import Family
from .listing import Running

HELP = {
    "ffrtmp_jobs": "Jobs by state: started (a contract or result seen), completed (result frozen).",
    "ffrtmp_platform_sla": "Frozen results by platform SLA verdict.",
    "ffrtmp_platform_sla_violations": "Frozen results that violate the platform SLA, by reason.",
    "ffrtmp_jobs_by_mode": "Frozen results by mode (run, attach).",
    "ffrtmp_jobs_by_exit": "Frozen results by exit: 0, non_zero (a non-zero status or a signal), unknown.",
    "ffrtmp_watch_jobs": "Frozen results of jobs a watch rule adopted, by rule (their origin watch:RULE).",
    "ffrtmp_bad_records": "Record files skipped as unreadable or invalid (named in the log), by kind.",
}


def _counters(families: list[Family]) -> Iterator[Metric]:
    for name, label, values in families:
        m = CounterMetricFamily(name, HELP[name], labels=[label])
        for value, n in values.items():
            m.add_metric([value], n)
        yield m


def _live(jobs: list[Running] | None) -> Iterator[Metric]:
    """The gauges of the running scopes; `jobs` None: systemd did not answer (ffrtmp_systemd_up 0)."""
    up = GaugeMetricFamily("ffrtmp_systemd_up", "1 if systemd answered for the live gauges, else 0.")
    up.add_metric([], 0 if jobs is None else 1)
    yield up
    if jobs is None:
        return
    yield GaugeMetricFamily("ffrtmp_running_jobs", "ffrtmp scopes systemd runs now.", value=len(jobs))
    mem = GaugeMetricFamily(
        "ffrtmp_job_memory_bytes", "Memory of a running job's scope (systemd's MemoryCurrent).",
        labels=["job_id", "mode"],
    )  # fmt: skip
    cpu = CounterMetricFamily(
        "ffrtmp_job_cpu_seconds", "CPU time of a running job's scope (systemd's CPUUsageNSec).",
        labels=["job_id", "mode"],
    )  # fmt: skip
    for j in jobs:
        if j.memory_bytes is not None:
            mem.add_metric([j.job_id, j.mode or ""], j.memory_bytes)
        if j.cpu_seconds is not None:
            cpu.add_metric([j.job_id, j.mode or ""], j.cpu_seconds)
    yield mem
    yield cpu


class _Snapshot:
    """A collector of values already taken (prometheus_client asks a registry's collectors)."""

    def __init__(self, families: list[Family], jobs: list[Running] | None) -> None:
        self.families, self.jobs = families, jobs

    def collect(self) -> Iterator[Metric]:
        yield from _counters(self.families)
        yield from _live(self.jobs)


def exposition(families: list[Family], jobs: list[Running] | None, accept: str) -> tuple[str, bytes]:
    """(content type, body): Prometheus text, or OpenMetrics when `accept` asks for it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families, jobs))
    encode, ctype = choose_encoder(accept)
    return ctype, encode(registry)
