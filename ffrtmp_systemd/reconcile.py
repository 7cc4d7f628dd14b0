"""Reconciliation of orphaned jobs: freeze `observer_lost` once the wrapper and the scope are gone. ONLY.

A contract whose wrapper died (kill -9, OOM, a reboot of its host process) stays in jobs/. Once its
wrapper's PID and its scope are both gone (and its workload's PID too: an ungoverned run has no
scope), the result is frozen exactly once with exit code unknown and the contract removed. A live PID
is the wrapper only if its boot id and start time are those in the contract (older contracts without
them: if the contract is of this boot). A bad record is named and skipped, never fatal to the others.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .errors import FfrtmpError
from .names import job_of
from .proc import boot_time, identity, start_time
from .report.result import Contract, Outcome, Reason, Result, freeze, parse_rfc3339
from .report.store import BadRecord, Store
from .systemd.bus import RUNNING, Bus, BusError, stamp, with_bus

log = logging.getLogger(__name__)
SLACK = timedelta(seconds=2)  # /proc start times are only as exact as btime (whole seconds)


@dataclass(frozen=True)
class LeftAlone:
    """A job that is not an orphan (yet): `pid` is a live process it still waits for, if any."""

    job_id: str
    why: str
    pid: int | None = None


@dataclass(frozen=True)
class Unreadable:
    """A contract that could not be read: skipped, named in `why`."""

    job_id: str
    why: str


def alive(pid: int) -> bool:
    """A process (not a thread) with this PID exists and is not a zombie."""
    return identity(pid) is not None


def wrapper_alive(c: Contract) -> bool:
    """The wrapper's PID is alive AND is the wrapper (a reboot or a reused PID makes it someone else)."""
    now = identity(c.wrapper_pid)
    if now is None or c.wrapper_id is not None:
        return now is not None and now == c.wrapper_id
    return parse_rfc3339(c.start_time) + SLACK >= boot_time()  # older contracts: of this boot


def workload_alive(c: Contract) -> bool:
    """The workload's PID is alive AND is the same process (started no later than the contract says)."""
    try:
        return alive(c.pid) and start_time(c.pid) <= parse_rfc3339(c.start_time) + SLACK
    except (OSError, ValueError):
        return False


def _look(store: Store, job: str) -> Contract | LeftAlone | Unreadable | None:
    """The contract, unless it is unreadable, absent or its wrapper still runs. Reads files."""
    try:
        c = store.contract(job)
    except BadRecord as err:
        log.warning("ffrtmp: job %s: not reconciled: %s", job, err)
        return Unreadable(job, str(err))
    if c is not None and wrapper_alive(c):
        return LeftAlone(job, f"its wrapper (PID {c.wrapper_pid}) is running", c.wrapper_pid)
    return c


def _governed(store: Store, job: str) -> None:
    """Seen governed: a later reconcile can say so even once the scope is gone. Writes a file."""
    with contextlib.suppress(FfrtmpError):
        store.amend(job, governed=True)


def _orphan(store: Store, c: Contract, end: datetime | None, governed: bool) -> Result | LeftAlone | None:
    """Freeze `observer_lost` once, unless the workload still runs. Reads and writes files."""
    job = c.job_id
    if workload_alive(c):
        return LeftAlone(job, f"its workload (PID {c.pid}) is running", c.pid)
    if store.result(job) is not None:  # the wrapper froze its result, then died before dropping this
        store.drop_contract(job)
        return None
    error = f"observer lost: wrapper PID {c.wrapper_pid} exited before freezing a result"
    o = Outcome(end or datetime.now(UTC))
    result, err = store.freeze_job(c, lambda c: freeze(c, o, governed, error, Reason.OBSERVER_LOST))
    if err is not None:
        if store.result(job) is None:
            raise err
        return None  # a concurrent reconcile (or the wrapper itself) froze it first: exactly once
    log.info("ffrtmp: job %s: observer lost, result frozen", job)
    return result


async def reconcile_job(store: Store, bus: Bus, job: str) -> Result | LeftAlone | Unreadable | None:
    """The frozen `observer_lost` result, or why the job was left alone; None if there is nothing to do.
    Files are read and written in worker threads: the caller's event loop is never blocked by one."""
    c = await asyncio.to_thread(_look, store, job)
    if not isinstance(c, Contract):
        return c
    end: datetime | None = None
    units = await bus.list_units(c.unit)
    for _name, state, path in units:
        if state in RUNNING:
            if not c.governed:
                await asyncio.to_thread(_governed, store, job)
            return LeftAlone(job, f"{c.unit} is {state}")
        end = stamp((await bus.properties(path)).get("InactiveEnterTimestamp"))
    return await asyncio.to_thread(_orphan, store, c, end, c.governed or bool(units))


def sweep(store: Store) -> None:
    """Remove the half-written files of writers that are gone; a live writer's file is its own."""
    for p, pid in store.sweep(lambda pid: not alive(pid)):
        log.info("ffrtmp: removed %s, left by PID %d killed while writing it", p, pid)


async def reconcile_all(
    store: Store, bus: Bus, observed: Callable[[str], bool] = lambda job: False
) -> list[Result | LeftAlone | Unreadable]:
    """Every contract's job looked at once, but those `observed` (by a live host of theirs)."""
    await asyncio.to_thread(sweep, store)
    out: list[Result | LeftAlone | Unreadable] = []
    for job in await asyncio.to_thread(store.ids, store.jobs):
        if observed(job):
            continue
        try:
            r = await reconcile_job(store, bus, job)
        except FfrtmpError as err:  # one unreadable record must not stop the others
            log.warning("ffrtmp: job %s: not reconciled: %s", job, err)
            continue
        if r is not None:
            out.append(r)
    return out


def reconcile(store: Store) -> list[Result | LeftAlone | Unreadable]:
    """`ffrtmp reconcile`: one pass over every contract."""

    try:
        return with_bus(lambda bus: reconcile_all(store, bus))
    except BusError as err:
        raise FfrtmpError(f"cannot reach systemd: {err}") from None


class Reconciler:
    """Reconciliation as events come, in a running event loop (the exporter's, or any long-lived host's):
    a job is looked at when its scope is removed (`unit_removed`, for Bus.on_unit_removed) and, left
    alone while a process of it lives, again when that process exits (its pidfd). No polling. A job
    that `observed(job)` says its host follows itself (the agent's own jobs) is never touched here:
    its host freezes it."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        unreadable: Callable[[str], None],
        observed: Callable[[str], bool] = lambda job: False,
    ) -> None:
        self.store, self.bus, self.unreadable, self.observed = store, bus, unreadable, observed
        self._tasks: set[asyncio.Task[None]] = set()
        self._pidfds: dict[str, int] = {}  # job -> pidfd of a process it waits for

    def _spawn(self, job: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reconcile(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def unit_removed(self, unit: str) -> None:
        if (job := job_of(unit)) is not None:
            self._spawn(job)

    async def reconcile(self, job: str) -> None:
        if self.observed(job):
            return
        try:
            self._after(await reconcile_job(self.store, self.bus, job))
        except (FfrtmpError, BusError) as err:
            log.warning("ffrtmp: job %s: not reconciled: %s", job, err)

    async def reconcile_all(self) -> None:
        for r in await reconcile_all(self.store, self.bus, self.observed):
            self._after(r)

    def _after(self, r: Result | LeftAlone | Unreadable | None) -> None:
        if isinstance(r, Unreadable):
            self.unreadable(r.job_id)
        if not isinstance(r, LeftAlone) or r.pid is None or r.job_id in self._pidfds:
            return
        try:
            fd = os.pidfd_open(r.pid)
        except ProcessLookupError:
            self._spawn(r.job_id)
            return
        except OSError as err:
            log.warning("ffrtmp: job %s: cannot watch PID %d: %s", r.job_id, r.pid, err)
            return
        self._pidfds[r.job_id] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, r.job_id)

    def _exited(self, job: str) -> None:
        self._unwatch(job)
        self._spawn(job)

    def _unwatch(self, job: str) -> None:
        fd = self._pidfds.pop(job)
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)

    def close(self) -> None:
        """Every pidfd closed; a reconciliation under way finishes or is cancelled with the loop."""
        for job in list(self._pidfds):
            self._unwatch(job)
