"""What run and attach share: the contract, the scope's properties, the freeze at the end. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import journal
from ..errors import FfrtmpError
from ..limits import Limits, to_properties
from ..names import printable, unit_name
from ..observe.watch import Watch
from ..proc import identity
from ..report.result import Contract, Mode, Outcome, Result, freeze, rfc3339
from ..report.store import Store
from ..systemd.bus import MANAGER, SD_PATH, Bus, BusError, on_user_bus

log = logging.getLogger(__name__)
Say = Callable[[int, str], None]  # (syslog priority 3 error, 4 warning, 6 info; line): a wrapper's word


def logged(priority: int, line: str) -> None:
    """Say through logging (the in-process wrappers: cli.py prints and journals it)."""
    log.log(logging.ERROR if priority <= 3 else logging.WARNING if priority == 4 else logging.INFO, line)


def contract(
    job: str, mode: Mode, pid: int, limits: Limits, intent: str | None, t: datetime, **kw: Any
) -> Contract:
    """The job's contract; its wrapper (`wrapper`, default this process) is the one that asks for the
    freeze: a client of the agent, or this process."""
    me = kw.pop("wrapper", None) or os.getpid()
    kw["wrapper_id"] = identity(me)
    return Contract(job, mode, pid, unit_name(job), limits.as_dict(), intent, me, rfc3339(t), **kw)


async def start_scope(bus: Bus, c: Contract, pids: list[int]) -> None:
    """The job's scope, with the contract's limits. OOMPolicy=continue where the manager knows it: the
    kernel's OOM victim is the only process that dies (systemd would stop the rest)."""
    what = shlex.join(map(printable, c.command)) if c.command else f"PID {c.pid}"
    await bus.start_scope(
        c.unit,
        [
            ("PIDs", "au", pids),
            ("Slice", "s", "ffrtmp.slice"),
            # AddRef keeps an ended scope loaded while our connection lives, for the settle's reads. Not in
            # the agent: its connection never ends, and systemd tracks each ref with a match rule of its
            # own connection (dbus-daemon: 512), so the 500th scope's start stalled; the signals suffice.
            *([] if bus.broad else [("AddRef", "b", True)]),
            ("CollectMode", "s", "inactive-or-failed"),
            ("Description", "s", f"ffrtmp {c.mode} job {c.job_id}: {what}"[:500]),
            *to_properties(Limits.from_dict(c.limits)),
            *([("OOMPolicy", "s", "continue")] if bus.scope_oom_policy else []),
        ],
    )


# The cgroup controller each limit needs (what a user manager gets is what user@.service delegates).
CONTROLLERS = {"cpu_quota_per_sec_usec": "cpu", "cpu_period_usec": "cpu", "cpu_weight": "cpu"}
CONTROLLERS.update(memory_max="memory", io_weight="io", io_max="io")


def mark_governed(store: Store, c: Contract, bind: bool = True) -> None:
    """The scope is ours: noted in the contract, and (`bind`) this process's journal entries are tied to
    it from now on."""
    with contextlib.suppress(FfrtmpError):
        store.amend(c.job_id, governed=True)
    if bind:
        journal.bind_unit(c.unit, c.pid)


async def unenforced(bus: Bus, c: Contract, say: Say = logged) -> str | None:
    """Under a user manager, the limits its scopes cannot enforce (their controller is not delegated to
    it: not in its own cgroup's cgroup.controllers), said once; the record keeps it. None on the system
    manager: nothing is checked there."""
    if not on_user_bus() or not c.limits:
        return None
    try:
        cgroup = await bus.get(SD_PATH, MANAGER, "ControlGroup")  # the manager's own: what it was given
        have = Path(f"/sys/fs/cgroup{cgroup}/cgroup.controllers").read_text().split()
    except (BusError, OSError):  # unsure: claim nothing
        return None
    lost = [k for k in c.limits if CONTROLLERS[k] not in have]
    if not lost:
        return None
    names, missing = ", ".join(k.replace("_", "-") for k in lost), sorted({CONTROLLERS[k] for k in lost})
    note = f"not enforced: {names} (controller {', '.join(missing)} not delegated to the user manager)"
    say(4, f"ffrtmp: job {c.job_id}: {note}")
    return note


async def finish(
    store: Store,
    c: Contract,
    w: Watch,
    bus: Bus | None,
    error: str | None,
    status: tuple[int | None, int | None],
    start: datetime | None,
    attached: datetime | None = None,
    born_usec: int | None = None,
    note: str | None = None,
    say: Say = logged,
    own_bus: bool = True,
) -> Result:
    """Settle (unless detached), close the bus (`own_bus`: the job's own) and the watch (their descriptors
    free for the freeze under a low `ulimit -n`), freeze the result once. `status`: (exit code, signal) as
    seen here; `note`: what the record says besides (unenforced limits, a lost client)."""
    if w.stop_signal is None:
        await w.settle(bus, c.unit)
    if bus is not None and own_bus:
        bus.close()
    w.close()
    end = w.inactive_since or datetime.now(UTC)
    detached = w.stop_signal is not None
    outcome = Outcome(end, *status, w.oom, w.lost, detached, start, attached, w.seconds(born_usec))
    if w.blind and not error:
        say(4, f"ffrtmp: job {c.job_id}: {w.blind}")
    why = "; ".join(filter(None, (error, note) if error else (note, w.blind))) or None
    result, failed = await asyncio.to_thread(
        _freeze, store, c, outcome, error is None, why
    )  # fsyncs: off the loop
    if failed:
        say(3, f"ffrtmp: job {c.job_id}: result not saved: {failed}")
    return result


def _freeze(
    store: Store, c: Contract, o: Outcome, governed: bool, why: str | None
) -> tuple[Result, str | None]:
    with store.locked():  # `release` may have added limits_released_at: it is in the result, or refused
        with contextlib.suppress(FfrtmpError):
            c = store.contract(c.job_id) or c
        result = freeze(c, o, governed, why)
        try:
            store.freeze(result)
        except FfrtmpError as err:
            return result, str(err)
    return result, None
