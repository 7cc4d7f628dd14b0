"""What run and attach share: job ids, the scope's properties, the freeze at the end. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import journal
from ..errors import FfrtmpError, UsageError
from ..limits import Limits, to_properties
from ..observe.watch import Watch
from ..presentation import printable
from ..proc import identity
from ..report.result import Contract, Mode, Outcome, Result, freeze, rfc3339
from ..report.store import Store
from ..systemd.bus import MANAGER, SD_PATH, Bus, BusError, Property, on_user_bus

log = logging.getLogger(__name__)
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


def job_id(given: str | None) -> str:
    if given is None:
        return datetime.now(UTC).strftime("%Y%m%dT%H%M%S-") + os.urandom(3).hex()
    if not JOB_ID.fullmatch(given):
        raise UsageError(
            f"invalid job id {given!r}: use 1-100 of A-Z a-z 0-9 _ . : - (not starting with _ . : -)"
        )
    return given


def check_intent(given: str | None) -> str | None:
    if given is not None and (printable(given) != given or "|" in given):
        raise UsageError(
            f"invalid --intent '{printable(given)}': no control characters, '|' or non-UTF-8 bytes"
        )
    return given


def unit_name(job: str) -> str:
    return f"ffrtmp-{job}.scope"


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


# The cgroup controller each limit needs (what a user manager gets is what user@.service delegates).
CONTROLLERS = {"cpu_quota_per_sec_usec": "cpu", "cpu_period_usec": "cpu", "cpu_weight": "cpu"}
CONTROLLERS.update(memory_max="memory", io_weight="io", io_max="io")


def mark_governed(store: Store, c: Contract) -> None:
    """The scope is ours: noted in the contract, and the journal's entries are tied to it from now on."""
    with contextlib.suppress(FfrtmpError):
        store.update_contract(dataclasses.replace(store.contract(c.job_id) or c, governed=True))
    journal.bind_unit(c.unit, c.pid)


async def unenforced(bus: Bus, c: Contract, limits: Limits) -> str | None:
    """Under a user manager, the limits its scopes cannot enforce (their controller is not delegated to
    it: not in its own cgroup's cgroup.controllers), said once; the record keeps it. None on the system
    manager: nothing is checked there."""
    if not on_user_bus() or not limits.as_dict():
        return None
    try:
        cgroup = await bus.get(SD_PATH, MANAGER, "ControlGroup")  # the manager's own: what it was given
        have = Path(f"/sys/fs/cgroup{cgroup}/cgroup.controllers").read_text().split()
    except (BusError, OSError):  # unsure: claim nothing
        return None
    lost = [k for k in limits.as_dict() if CONTROLLERS[k] not in have]
    if not lost:
        return None
    names, missing = ", ".join(k.replace("_", "-") for k in lost), sorted({CONTROLLERS[k] for k in lost})
    note = f"not enforced: {names} (controller {', '.join(missing)} not delegated to the user manager)"
    log.warning("ffrtmp: job %s: %s", c.job_id, note)
    return note


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
    note: str | None = None,
) -> Result:
    end = w.inactive_since or datetime.now(UTC)
    detached = w.stop_signal is not None
    outcome = Outcome(end, exit_code, signal, w.oom, w.lost, detached, start, attached, w.seconds(born_usec))
    with contextlib.suppress(FfrtmpError):
        c = store.contract(c.job_id) or c  # `release` may have added limits_released_at
    if w.blind and not error:
        log.warning("ffrtmp: job %s: %s", c.job_id, w.blind)
    result = freeze(c, outcome, error is None, error or "; ".join(filter(None, (note, w.blind))) or None)
    try:
        store.freeze(result)
    except FfrtmpError as err:
        log.error("ffrtmp: job %s: result not saved: %s", c.job_id, err)
    return result
