"""Attach mode: adopt a running process and its descendants into a new scope, observe it. Adopt path ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from ..errors import FfrtmpError
from ..limits import Limits
from ..names import job_of
from ..observe.watch import Watch
from ..proc import check_adoptable, descendants, since_boot_usec, start_time
from ..report.result import Mode, Result
from ..report.store import Store
from ..systemd.bus import UNKNOWN, Bus, BusError, on_user_bus
from .job import contract, finish, mark_governed, start_scope, unenforced

log = logging.getLogger(__name__)


def attach(pid: int, job: str, limits: Limits, intent: str | None, force: bool, store: Store) -> Result:
    check_adoptable(pid)
    return asyncio.run(_attach(pid, job, limits, intent, force, store))


async def _attach(
    pid: int, job: str, limits: Limits, intent: str | None, force: bool, store: Store
) -> Result:
    try:
        w = Watch(pid)  # the pidfd pins this process: a reused PID cannot be mistaken for it
        born, born_usec = start_time(pid), since_boot_usec(pid)
    except (ProcessLookupError, FileNotFoundError):
        raise FfrtmpError(f"no process with PID {pid}") from None
    bus: Bus | None = None
    # From the checks to the move: of two attaches the later sees the first. Another's lock may be held
    # for seconds (its bus calls): waited for in a thread, the event loop never blocks on it.
    lock = await asyncio.to_thread(_lock, store.state_dir)
    try:
        try:
            try:
                bus = await Bus.connect()
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
                    f"PID {pid} belongs to {units[0]}: "
                    "moving it out cannot be undone (use --force to adopt it)"
                )
            if units[0] is None and on_user_bus() and not force:  # e.g. in a system service: not ours to take
                why = "is not under the user manager: moving it in cannot be undone"
                raise FfrtmpError(f"PID {pid} {why} (use --force to adopt it)")
            c = contract(job, Mode.ATTACH, pid, limits, intent, born, origin_unit=units[0])
            store.claim(c)
            try:
                await start_scope(bus, c, pids)
            except BusError as err:
                if err.name == UNKNOWN:  # the PID may be in the scope yet: the contract stays for reconcile
                    raise FfrtmpError(
                        f"PID {pid} may or may not be adopted: {err}; contract kept for reconcile"
                    ) from None
                store.drop_contract(job)
                gone = w.exited() or err.name.endswith("UnixProcessIdUnknown")
                raise FfrtmpError(
                    f"PID {pid} has exited" if gone else f"cannot adopt PID {pid}: {err}"
                ) from None
        finally:
            if lock >= 0:
                os.close(lock)
        attached = datetime.now(UTC)
        mark_governed(store, c)
        try:
            await w.follow(bus, c.unit)
        except BusError as err:
            log.warning("ffrtmp: job %s: cannot follow %s: %s", job, c.unit, err)
        log.info("ffrtmp: job %s: PID %d adopted into %s", job, pid, c.unit)
        note = await unenforced(bus, c)
        await w.wait()
        return await finish(store, c, w, bus, None, (None, None), born, attached, born_usec, note)
    finally:  # on every path; after finish() nothing is left to close
        w.close()
        if bus is not None:
            bus.close()


def _lock(state_dir: Path) -> int:
    with contextlib.suppress(OSError):  # no state directory: the claim refuses (its own line), nothing moves
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    return -1
