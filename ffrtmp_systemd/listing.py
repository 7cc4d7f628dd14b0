"""What runs now (from systemd) and the recent frozen results (from the store): reading ONLY.

Used by `ffrtmp ls` (shown by presentation.py) and by the exporter's live gauges.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import FfrtmpError
from .limits import INFINITY  # also systemd's "not set" for counters it does not track
from .names import job_of, unit_name
from .report.result import Contract, Result, rfc3339
from .report.store import BadRecord, Store
from .systemd.bus import RUNNING, SCOPE, Bus, BusError, in_order, stamp, with_bus

log = logging.getLogger(__name__)


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
    origin: str | None = None  # its contract's: watch:RULE for a job a watch rule made


def _known(value: object) -> int | None:
    return value if isinstance(value, int) and value != INFINITY else None


def _contracts(store: Store, jobs: list[str]) -> list[Contract | None]:
    """Their contracts (None: none here, or unreadable); reads files: in a worker thread."""
    out: list[Contract | None] = []
    for job in jobs:
        try:
            out.append(store.contract(job))
        except FfrtmpError:
            out.append(None)
    return out


async def running(bus: Bus, store: Store, pids: bool = True) -> list[Running]:
    """Every ffrtmp scope systemd runs now; one that vanishes while being read is left out. The
    contracts are read in a worker thread: an event loop that awaits this is never blocked by a file."""
    seen = []
    for unit, state, path in await bus.list_units(unit_name("*")):
        if state in RUNNING:
            try:
                asks = [bus.properties(path), bus.properties(path, SCOPE)]  # one round trip
                got = await in_order(*asks, *([bus.unit_processes(unit)] if pids else []))
            except BusError:
                continue
            seen.append((job_of(unit) or unit, unit, state, got[0], got[1], tuple(got[2]) if pids else ()))
    contracts = await asyncio.to_thread(_contracts, store, [s[0] for s in seen])
    now, out = datetime.now(UTC), []
    for (job, unit, state, props, scope, procs), c in zip(seen, contracts, strict=True):
        since = stamp(props.get("ActiveEnterTimestamp"))
        cpu = _known(scope.get("CPUUsageNSec"))
        out.append(
            Running(
                job_id=job,
                unit=unit,
                state=state,
                pids=procs,
                mode=str(c.mode) if c else None,
                limits=c.limits if c else None,
                memory_bytes=_known(scope.get("MemoryCurrent")),
                cpu_seconds=None if cpu is None else cpu / 1e9,
                since=rfc3339(since) if since else None,
                age_seconds=round((now - since).total_seconds(), 3) if since else None,
                origin=c.origin if c else None,
            )
        )
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
