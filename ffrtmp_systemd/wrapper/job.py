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
from ..systemd.bus import Property

log = logging.getLogger(__name__)


def contract(
    job: str, mode: Mode, pid: int, limits: Limits, intent: str | None, t: datetime, **kw: Any
) -> Contract:
    me, unit = os.getpid(), unit_name(job)
    kw["wrapper_id"] = identity(me)
    return Contract(job, mode, pid, unit, limits.as_dict(), intent, me, rfc3339(t), **kw)


def scope_properties(c: Contract, pids: list[int], limits: Limits, oom_continue: bool) -> list[Property]:
    """oom_continue: the kernel's OOM victim is the only process that dies (systemd would stop the rest)."""
    what = shlex.join(map(printable, c.command)) if c.command else f"PID {c.pid}"
    return [
        ("PIDs", "au", pids),
        ("Slice", "s", "ffrtmp.slice"),
        ("AddRef", "b", True),
        ("CollectMode", "s", "inactive-or-failed"),
        ("Description", "s", f"ffrtmp {c.mode} job {c.job_id}: {what}"[:500]),
        *to_properties(limits),
        *([("OOMPolicy", "s", "continue")] if oom_continue else []),
    ]


def mark_governed(store: Store, c: Contract) -> None:
    with contextlib.suppress(FfrtmpError):
        store.amend(c.job_id, governed=True)


def finish(
    store: Store,
    c: Contract,
    w: Watch,
    error: str | None,
    exit_code: int | None,
    signal: int | None,
    start: datetime | None,
    attached: datetime | None = None,
    born_usec: int | None = None,
) -> Result:
    end = w.inactive_since or datetime.now(UTC)
    detached = w.stop_signal is not None
    outcome = Outcome(end, exit_code, signal, w.oom, w.lost, detached, start, attached, w.seconds(born_usec))
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
