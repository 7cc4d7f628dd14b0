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
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import FfrtmpError, StateError
from ..limits import Limits
from ..names import job_of
from ..observe.watch import Watch
from ..proc import descendants, since_boot_usec, start_time
from ..report.result import Contract, Mode, Outcome, Result, contract, freeze, parse_rfc3339
from ..report.store import Store
from ..systemd.bus import UNKNOWN, Bus, BusError, on_user_bus
from .job import Say, start_scope, unenforced

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
    c = contract(
        job, Mode.RUN, pid, limits.as_dict(), intent, datetime.now(UTC), command=cmd, wrapper=wrapper
    )
    claimed = False
    try:
        await asyncio.to_thread(store.claim, c)  # fsyncs: off the event loop
        claimed = True
    except StateError as err:  # disk trouble fails the record, never the workload: run it, governed
        say(3, f"ffrtmp: job {job}: contract not saved, the workload runs all the same: {err}")
    try:
        w = Watch(pid)
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
        w = Watch(pid)  # the pidfd pins this process: a reused PID cannot be mistaken for it
        born, born_usec = start_time(pid), since_boot_usec(pid)
    except (ProcessLookupError, FileNotFoundError):
        raise FfrtmpError(f"no process with PID {pid}") from None
    try:
        async with _held(lock, store):
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
                why = "moving it out cannot be undone (use --force to adopt it)"
                raise FfrtmpError(f"PID {pid} belongs to {units[0]}: {why}")
            if units[0] is None and on_user_bus() and not force:  # e.g. in a system service: not ours to take
                why = "is not under the user manager: moving it in cannot be undone"
                raise FfrtmpError(f"PID {pid} {why} (use --force to adopt it)")
            kw = {"origin_unit": units[0], "wrapper": wrapper, "origin": origin}
            c = contract(job, Mode.ATTACH, pid, limits.as_dict(), intent, born, **kw)
            await asyncio.to_thread(store.claim, c)
            if w.exited():  # while we waited (the lock): its PID may be another process's now, never moved
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
                why = f"PID {pid} has exited" if gone else f"cannot adopt PID {pid}: {err}"
                raise FfrtmpError(why) from None
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


async def _governed(store: Store, c: Contract, w: Watch, bus: Bus) -> None:
    """The scope is ours: the contract says so (its fsyncs, in a worker thread) while the watch follows the
    unit (its bus calls); both done before the caller is answered."""
    follow = asyncio.ensure_future(w.follow(bus, c.unit))
    try:
        with contextlib.suppress(FfrtmpError):
            await asyncio.to_thread(store.amend, c.job_id, governed=True)
    finally:
        await follow


@contextlib.asynccontextmanager
async def _held(lock: Lock, store: Store) -> AsyncIterator[None]:
    """The lock under which an attach checks and moves: the agent's, else the state directory's flock
    (waited for in a thread)."""
    if lock is not None:
        async with lock:
            yield
        return
    fd = await asyncio.to_thread(store.flock)
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


async def resume(
    bus: Bus, store: Store, c: Contract, same: Callable[[Contract], bool], say: Say
) -> Job | None:
    """A job whose wrapper is gone and whose workload still runs (`same`: the same process, checked once
    its pidfd pins it) and whose scope is there: observed again. None: left to reconcile."""
    try:
        w = Watch(c.pid)
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
    """Wait for the end as this host sees it (the pidfd; a Detach ends the wait), settle (unless detached),
    close the watch (its descriptors free for the freeze under a low `ulimit -n`), freeze once. `status`:
    (exit code, signal) as seen here; `note`: what the record says besides (a lost client)."""
    w, c = j.w, j.c
    await w.wait()
    if w.stop_signal is None:
        await w.settle(bus, c.unit)
    w.close()
    start = j.start if c.mode == Mode.ATTACH else (w.active_since or j.start)
    end = w.inactive_since or datetime.now(UTC)
    detached = w.stop_signal is not None
    o = Outcome(end, *status, w.oom, w.lost, detached, start, j.attached, w.seconds(j.born_usec))
    if w.blind and not j.error:
        j.say(4, f"ffrtmp: job {c.job_id}: {w.blind}")
    why = "; ".join(filter(None, (j.error, j.note, note) if j.error else (j.note, note, w.blind))) or None
    result, failed = await asyncio.to_thread(
        j.store.freeze_job, c, lambda c: freeze(c, o, j.error is None, why)
    )  # fsyncs: off the loop
    if failed:
        j.say(3, f"ffrtmp: job {c.job_id}: result not saved: {failed}")
    return result
