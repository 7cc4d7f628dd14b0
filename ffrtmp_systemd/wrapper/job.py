"""What run and attach share: the contract, the scope's properties, the freeze at the end. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import journal
from ..errors import FfrtmpError
from ..limits import Limits, to_properties
from ..names import unit_name
from ..observe.watch import Watch
from ..presentation import printable
from ..proc import identity
from ..report.result import Contract, Mode, Outcome, Result, freeze, rfc3339
from ..report.store import Store
from ..systemd.bus import MANAGER, SD_PATH, Bus, BusError, on_user_bus

log = logging.getLogger(__name__)


def contract(
    job: str, mode: Mode, pid: int, limits: Limits, intent: str | None, t: datetime, **kw: Any
) -> Contract:
    """The job's contract; its wrapper is this process (the one that will freeze it)."""
    me = os.getpid()
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
            ("AddRef", "b", True),
            ("CollectMode", "s", "inactive-or-failed"),
            ("Description", "s", f"ffrtmp {c.mode} job {c.job_id}: {what}"[:500]),
            *to_properties(Limits.from_dict(c.limits)),
            *([("OOMPolicy", "s", "continue")] if bus.scope_oom_policy else []),
        ],
    )


# The cgroup controller each limit needs (what a user manager gets is what user@.service delegates).
CONTROLLERS = {"cpu_quota_per_sec_usec": "cpu", "cpu_period_usec": "cpu", "cpu_weight": "cpu"}
CONTROLLERS.update(memory_max="memory", io_weight="io", io_max="io")


def mark_governed(store: Store, c: Contract) -> None:
    """The scope is ours: noted in the contract, and the journal's entries are tied to it from now on."""
    with contextlib.suppress(FfrtmpError):
        store.amend(c.job_id, governed=True)
    journal.bind_unit(c.unit, c.pid)


async def unenforced(bus: Bus, c: Contract) -> str | None:
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
    log.warning("ffrtmp: job %s: %s", c.job_id, note)
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
) -> Result:
    """Settle (unless detached), close the bus and the watch (their descriptors free for the freeze
    under a low `ulimit -n`), freeze the result once. `status`: (exit code, signal) as seen here; `note`:
    what the record says besides (unenforced limits)."""
    if w.stop_signal is None:
        await w.settle(bus, c.unit)
    if bus is not None:
        bus.close()
    w.close()
    end = w.inactive_since or datetime.now(UTC)
    detached = w.stop_signal is not None
    outcome = Outcome(end, *status, w.oom, w.lost, detached, start, attached, w.seconds(born_usec))
    if w.blind and not error:
        log.warning("ffrtmp: job %s: %s", c.job_id, w.blind)
    with store.locked():  # `release` may have added limits_released_at: it is in the result, or refused
        with contextlib.suppress(FfrtmpError):
            c = store.contract(c.job_id) or c
        result = freeze(c, outcome, error is None, error or "; ".join(filter(None, (note, w.blind))) or None)
        try:
            store.freeze(result)
        except FfrtmpError as err:
            log.error("ffrtmp: job %s: result not saved: %s", c.job_id, err)
    return result
