"""What run and attach share: the scope's properties, the limits it cannot enforce, a wrapper's word. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from pathlib import Path

from ..limits import Limits, to_properties
from ..names import printable
from ..report.result import Contract
from ..systemd.bus import MANAGER, SD_PATH, Bus, BusError, on_user_bus

log = logging.getLogger(__name__)
Say = Callable[[int, str], None]  # (syslog priority 3 error, 4 warning, 6 info; line): a wrapper's word


def logged(priority: int, line: str) -> None:
    """Say through logging (the in-process wrappers: cli.py prints and journals it)."""
    log.log(logging.ERROR if priority <= 3 else logging.WARNING if priority == 4 else logging.INFO, line)


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


async def unenforced(bus: Bus, c: Contract, say: Say) -> str | None:
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
