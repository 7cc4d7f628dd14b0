"""What runs now (from systemd) and the recent frozen results (from the store): reading ONLY.

Used by `ffrtmp ls` and by the exporter's live gauges.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import FfrtmpError
from .report.result import Result, rfc3339
from .report.store import BadRecord, Store
from .systemd.bus import Bus, BusError, with_bus

log = logging.getLogger(__name__)
UNKNOWN = 2**64 - 1  # systemd's "not set" for counters it does not track
RUNNING = ("active", "activating", "deactivating", "reloading", "refreshing")
PREFIX, SUFFIX = "ffrtmp-", ".scope"


@dataclass(frozen=True)
class Running:
    """One governed scope now. mode and limits come from its contract (None if it has none here)."""

    job_id: str
    unit: str
    state: str
    pids: tuple[int, ...]
    mode: str | None
    limits: dict[str, Any] | None
    memory_bytes: int | None
    cpu_seconds: float | None
    since: str | None
    age_seconds: float | None


def _known(value: object) -> int | None:
    return value if isinstance(value, int) and value != UNKNOWN else None


async def _one(bus: Bus, store: Store, unit: str, state: str, path: str, pids: bool) -> Running:
    job = unit[len(PREFIX) : -len(SUFFIX)]
    props = await bus.properties(path)
    scope = await bus.properties(path, "org.freedesktop.systemd1.Scope")
    try:
        c = store.contract(job)
    except FfrtmpError:
        c = None
    usec = props.get("ActiveEnterTimestamp") or 0
    since = datetime.fromtimestamp(usec / 1e6, UTC) if usec else None
    cpu = _known(scope.get("CPUUsageNSec"))
    return Running(
        job_id=job,
        unit=unit,
        state=state,
        pids=tuple(await bus.unit_processes(unit)) if pids else (),
        mode=str(c.mode) if c else None,
        limits=c.limits if c else None,
        memory_bytes=_known(scope.get("MemoryCurrent")),
        cpu_seconds=None if cpu is None else cpu / 1e9,
        since=rfc3339(since) if since else None,
        age_seconds=round((datetime.now(UTC) - since).total_seconds(), 3) if since else None,
    )


async def running(bus: Bus, store: Store, pids: bool = True) -> list[Running]:
    """Every ffrtmp scope systemd runs now; one that vanishes while being read is left out."""
    out = []
    for unit, state, path in await bus.list_units(f"{PREFIX}*{SUFFIX}"):
        if state in RUNNING:
            try:
                out.append(await _one(bus, store, unit, state, path, pids))
            except BusError:
                continue
    return sorted(out, key=lambda r: r.job_id)


def recent(store: Store, n: int) -> list[Result]:
    """The `n` newest results, newest first (by file time: only those n files are read); bad ones named."""
    out = []
    for job in store.ids(store.results, newest=n):
        try:
            r = store.result(job)
        except BadRecord as err:
            log.warning("ffrtmp: skipped %s", err)
            continue
        if r is not None:
            out.append(r)
    return sorted(out, key=lambda r: r.end_time, reverse=True)


def listing(store: Store, results: int) -> tuple[list[Running], list[Result]]:
    try:
        live = with_bus(lambda bus: running(bus, store))
    except BusError as err:
        raise FfrtmpError(f"cannot reach systemd: {err}") from None
    return live, recent(store, results) if results else []


def to_json(live: list[Running], done: list[Result]) -> str:
    doc = {"running": [asdict(r) for r in live], "results": [asdict(r) for r in done]}
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}T"


def _limits(d: dict[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items())) if d else "-"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def table(live: list[Running], done: list[Result] | None) -> str:
    """A table for people: running jobs, then (with --all) the recent results."""
    rows = [["JOB", "MODE", "STATE", "PIDS", "MEMORY", "CPU", "AGE", "LIMITS"]]
    for r in live:
        cpu = "-" if r.cpu_seconds is None else f"{r.cpu_seconds:.1f}s"
        age = "-" if r.age_seconds is None else f"{r.age_seconds:.0f}s"
        pids = ",".join(map(str, r.pids)) or "-"
        rows.append(
            [r.job_id, r.mode or "-", r.state, pids, _size(r.memory_bytes), cpu, age, _limits(r.limits)]
        )
    out = _columns(rows)
    if done is not None:
        rows = [["JOB", "MODE", "SLA", "REASON", "EXIT", "RUNTIME", "ENDED"]]
        for x in done:
            sla = "compliant" if x.platform_sla_compliant else "VIOLATION"
            ex = "-" if x.exit_code is None else str(x.exit_code)
            t = f"{x.processing_seconds:.1f}s"
            rows.append([x.job_id, str(x.mode), sla, str(x.platform_sla_reason), ex, t, x.end_time])
        out += ["", *_columns(rows)]
    return "\n".join(out) + "\n"
