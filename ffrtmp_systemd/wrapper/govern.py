"""A job's governance as coroutines any host runs (the agent, or a client's own thread): start a run's
scope, adopt a PID, resume a job, freeze it at its end. The caller (the job's wrapper) is a PID given
here; what it should say comes back through `say`. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import FfrtmpError, StateError
from ..limits import Limits
from ..names import job_of
from ..observe.watch import Watch
from ..proc import descendants, since_boot_usec, start_time
from ..report.result import Contract, Mode, Result, parse_rfc3339
from ..report.store import Store
from ..systemd.bus import UNKNOWN, Bus, BusError, on_user_bus
from .job import Say, contract, finish, mark_governed, start_scope, unenforced

Lock = asyncio.Lock | None  # the agent's node-wide attach lock; None: the state directory's flock
Connect = Callable[[], Awaitable[Bus]]  # the host's bus, connected now if it is not yet


@dataclass
class Job:
    """A job being observed: its contract, its watch, what the freeze will need."""

    c: Contract
    store: Store
    w: Watch
    say: Say
    error: str | None = None  # why it is not governed
    start: datetime | None = None
    attached: datetime | None = None
    born_usec: int | None = None
    note: str | None = None  # what the record says besides
    result: asyncio.Future[Result | None] | None = None

    def drop(self) -> None:
        """It never ran (its exec failed): no record."""
        with contextlib.suppress(FfrtmpError):
            self.store.drop_contract(self.c.job_id)
        self.w.close()


async def start(
    connect: Connect,
    store: Store,
    job: str,
    pid: int,
    limits: Limits,
    intent: str | None,
    cmd: list[str],
    wrapper: int,
    say: Say,
) -> Job:
    """Run: the contract, the scope holding `pid` (the wrapper's child waiting for its go), followed.
    Refused (FfrtmpError): nothing is left. Not governed: the job's `error` says why, it runs all the same."""
    c = contract(job, Mode.RUN, pid, limits, intent, datetime.now(UTC), command=cmd, wrapper=wrapper)
    claimed = False
    try:
        await asyncio.to_thread(store.claim, c)  # fsyncs: off the event loop
        claimed = True
    except StateError as err:  # disk trouble fails the record, never the workload: run it, governed
        say(3, f"ffrtmp: job {job}: contract not saved, the workload runs all the same: {err}")
    try:
        w = Watch(pid, stop_signals=())
    except OSError as err:
        if claimed:
            store.drop_contract(job)
        raise FfrtmpError(f"job {job} not started: {err}") from None
    j = Job(c, store, w, say)
    try:
        bus = await connect()
        await start_scope(bus, c, [pid])
    except BusError as err:
        if err.name == "org.freedesktop.systemd1.UnitExists":
            w.close()
            if claimed:
                store.drop_contract(job)
            raise FfrtmpError(f"unit {c.unit} already exists: job id {job!r} is taken") from None
        j.error = str(err)
    if j.error is None:
        with contextlib.suppress(BusError):  # before the exec, so that no early event is missed
            await _governed(store, c, w, bus)
        j.note = await unenforced(bus, c, say)
    j.start = datetime.now(UTC)
    return j


async def adopt(
    connect: Connect,
    store: Store,
    job: str,
    pid: int,
    limits: Limits,
    intent: str | None,
    force: bool,
    wrapper: int,
    lock: Lock,
    say: Say,
    origin: str | None = None,
) -> Job:
    """Attach: the checks and the move under the lock (of two attaches the later sees the first), then
    followed. Refused (FfrtmpError, its exit status): nothing was moved."""
    try:
        w = Watch(pid, stop_signals=())  # the pidfd pins this process: a reused PID cannot be mistaken for it
        born, born_usec = start_time(pid), since_boot_usec(pid)
    except (ProcessLookupError, FileNotFoundError):
        raise FfrtmpError(f"no process with PID {pid}") from None
    try:
        if lock is not None:
            async with lock:
                bus, c = await _move(
                    connect, store, job, pid, limits, intent, force, wrapper, w, born, origin
                )
        else:  # another's flock may be held for seconds (its bus calls): waited for in a thread
            fd = await asyncio.to_thread(_flock, store.state_dir)
            try:
                bus, c = await _move(
                    connect, store, job, pid, limits, intent, force, wrapper, w, born, origin
                )
            finally:
                if fd >= 0:
                    os.close(fd)
    except BaseException:
        w.close()
        raise
    j = Job(c, store, w, say, None, born, datetime.now(UTC), born_usec)
    try:
        await _governed(store, c, w, bus)
    except BusError as err:
        say(4, f"ffrtmp: job {job}: cannot follow {c.unit}: {err}")
    say(6, f"ffrtmp: job {job}: PID {pid} adopted into {c.unit}")
    j.note = await unenforced(bus, c, say)
    return j


async def _move(
    connect: Connect,
    store: Store,
    job: str,
    pid: int,
    limits: Limits,
    intent: str | None,
    force: bool,
    wrapper: int,
    w: Watch,
    born: datetime,
    origin: str | None,
) -> tuple[Bus, Contract]:
    try:
        bus = await connect()
        pids = [pid, *descendants(pid)]
        units = [await bus.unit_of_pid(p) for p in pids]
    except BusError as err:
        raise FfrtmpError(f"cannot reach systemd: {err}") from None
    for p, unit in zip(pids, units, strict=True):
        if (other := job_of(unit)) is not None:
            who = f"PID {pid}" if p == pid else f"PID {p} (a descendant of PID {pid})"
            raise FfrtmpError(f"{who} is already governed by job {other!r} ({unit})")
    if units[0] and units[0].endswith(".service") and not force:
        raise FfrtmpError(
            f"PID {pid} belongs to {units[0]}: moving it out cannot be undone (use --force to adopt it)"
        )
    if units[0] is None and on_user_bus() and not force:  # e.g. in a system service: not ours to take
        why = "is not under the user manager: moving it in cannot be undone"
        raise FfrtmpError(f"PID {pid} {why} (use --force to adopt it)")
    c = contract(
        job, Mode.ATTACH, pid, limits, intent, born, origin_unit=units[0], wrapper=wrapper, origin=origin
    )
    await asyncio.to_thread(store.claim, c)
    if w.exited():  # while we waited (the lock): its PID may be another process's now, never to be moved
        store.drop_contract(job)
        raise FfrtmpError(f"PID {pid} has exited")
    try:
        await start_scope(bus, c, pids)
    except BusError as err:
        if err.name == UNKNOWN:  # the PID may be in the scope yet: the contract stays for reconcile
            why = f"PID {pid} may or may not be adopted: {err}; contract kept for reconcile"
            raise FfrtmpError(why) from None
        store.drop_contract(job)
        gone = w.exited() or err.name.endswith("UnixProcessIdUnknown")
        raise FfrtmpError(f"PID {pid} has exited" if gone else f"cannot adopt PID {pid}: {err}") from None
    return bus, c


async def _governed(store: Store, c: Contract, w: Watch, bus: Bus) -> None:
    """The scope is ours: the contract says so (its fsyncs, in a worker thread) while the watch follows the
    unit (its bus calls); both done before the caller is answered."""
    follow = asyncio.ensure_future(w.follow(bus, c.unit))
    try:
        await asyncio.to_thread(mark_governed, store, c, False)
    finally:
        await follow


def _flock(state_dir: Path) -> int:
    with contextlib.suppress(OSError):  # no state directory: the claim refuses (its own line), nothing moves
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    return -1


async def resume(
    bus: Bus, store: Store, c: Contract, same: Callable[[Contract], bool], say: Say
) -> Job | None:
    """A job whose wrapper is gone and whose workload still runs (`same`: the same process, checked once
    its pidfd pins it) and whose scope is there: observed again. None: left to reconcile."""
    try:
        w = Watch(c.pid, stop_signals=())
    except OSError:
        return None
    try:
        if not same(c):
            raise BusError("", "not the same process")
        await w.follow(bus, c.unit)
    except BusError:
        w.close()
        return None
    born = parse_rfc3339(c.start_time)
    why = f"resumed: wrapper PID {c.wrapper_pid} was gone; exit status unknown"
    usec = since_boot_usec(c.pid) if c.mode == Mode.ATTACH else None
    return Job(c, store, w, say, None, born, None, usec, why)


async def end(
    j: Job, bus: Bus | None, status: tuple[int | None, int | None], note: str | None
) -> Result | None:
    """Wait for the end as this host sees it (the pidfd; a Detach ends the wait), then freeze once."""
    await j.w.wait()
    start = j.start if j.c.mode == Mode.ATTACH else (j.w.active_since or j.start)
    why = "; ".join(filter(None, (j.note, note))) or None
    return await finish(
        j.store, j.c, j.w, bus, j.error, status, start, j.attached, j.born_usec, why, j.say, own_bus=False
    )
