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
from typing import Any

from ..errors import FfrtmpError
from ..limits import Limits, to_properties
from ..names import unit_name
from ..observe.watch import Watch
from ..presentation import printable
from ..proc import identity
from ..report.result import Contract, Mode, Outcome, Result, freeze, rfc3339
from ..report.store import Store
from ..systemd.bus import Bus

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
    oom = await bus.scope_has("OOMPolicy")
    await bus.start_scope(
        c.unit,
        [
            ("PIDs", "au", pids),
            ("Slice", "s", "ffrtmp.slice"),
            ("AddRef", "b", True),
            ("CollectMode", "s", "inactive-or-failed"),
            ("Description", "s", f"ffrtmp {c.mode} job {c.job_id}: {what}"[:500]),
            *to_properties(Limits.from_dict(c.limits)),
            *([("OOMPolicy", "s", "continue")] if oom else []),
        ],
    )


def mark_governed(store: Store, c: Contract) -> None:
    with contextlib.suppress(FfrtmpError):
        store.amend(c.job_id, governed=True)


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
) -> Result:
    """Settle (unless detached), close the bus and the watch (their descriptors free for the freeze
    under a low `ulimit -n`), freeze the result once. `status`: (exit code, signal) as seen here."""
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
        result = freeze(c, outcome, error is None, error or w.blind)
        try:
            store.freeze(result)
        except FfrtmpError as err:
            log.error("ffrtmp: job %s: result not saved: %s", c.job_id, err)
    return result
