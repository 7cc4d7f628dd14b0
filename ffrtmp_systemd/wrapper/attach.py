"""Attach mode: adopt a running process and its descendants into a new scope, observe it. Adopt path ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from ..errors import FfrtmpError
from ..limits import Limits
from ..observe.watch import Watch
from ..proc import check_adoptable, descendants, start_time
from ..report.result import Mode, Result
from ..report.store import Store
from ..systemd.bus import UNKNOWN, Bus, BusError
from .job import contract, finish, mark_governed, scope_properties

log = logging.getLogger(__name__)


def attach(pid: int, job: str, limits: Limits, intent: str | None, force: bool, store: Store) -> Result:
    check_adoptable(pid)
    return asyncio.run(_attach(pid, job, limits, intent, force, store))


async def _attach(
    pid: int, job: str, limits: Limits, intent: str | None, force: bool, store: Store
) -> Result:
    try:
        w = Watch(pid)  # the pidfd pins this process: a reused PID cannot be mistaken for it
        born = start_time(pid)
    except (ProcessLookupError, FileNotFoundError):
        raise FfrtmpError(f"no process with PID {pid}") from None
    try:
        bus = await Bus.connect()
        origin = await bus.unit_of_pid(pid)
    except BusError as err:
        raise FfrtmpError(f"cannot reach systemd: {err}") from None
    if origin and origin.startswith("ffrtmp-") and origin.endswith(".scope"):
        raise FfrtmpError(f"PID {pid} is already governed by job {origin[7:-6]!r} ({origin})")
    if origin and origin.endswith(".service") and not force:
        raise FfrtmpError(
            f"PID {pid} belongs to {origin}: moving it out cannot be undone (use --force to adopt it)"
        )
    c = contract(job, Mode.ATTACH, pid, limits, intent, born, origin_unit=origin)
    store.claim(c)
    try:
        oom = await bus.scope_has("OOMPolicy")
        await bus.start_scope(c.unit, scope_properties(c, [pid, *descendants(pid)], limits, oom))
    except BusError as err:
        if err.name == UNKNOWN:  # the PID may be in the scope yet: the contract stays for `ffrtmp reconcile`
            raise FfrtmpError(
                f"PID {pid} may or may not be adopted: {err}; contract kept for reconcile"
            ) from None
        store.drop_contract(job)
        gone = w.exited() or err.name.endswith("UnixProcessIdUnknown")
        raise FfrtmpError(f"PID {pid} has exited" if gone else f"cannot adopt PID {pid}: {err}") from None
    attached = datetime.now(UTC)
    mark_governed(store, c)
    try:
        await w.follow(bus, c.unit)
    except BusError as err:
        log.warning("ffrtmp: job %s: cannot follow %s: %s", job, c.unit, err)
    log.info("ffrtmp: job %s: PID %d adopted into %s", job, pid, c.unit)
    await w.wait()
    if w.stop_signal is None:
        await w.settle(bus, c.unit)
    result = finish(store, c, w, None, None, None, born, attached)
    w.close()
    bus.close()
    return result
