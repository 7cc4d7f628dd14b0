"""Attach mode in this process: adopt a running process and its descendants into a new scope, observe
it (the governance is govern.py's, as in the agent). Adopt path ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import os

from .. import journal
from ..limits import Limits
from ..observe.watch import STOP_SIGNALS, Watch
from ..proc import check_adoptable
from ..report.result import Result
from ..report.store import Store
from ..systemd.bus import Bus
from .govern import adopt, end
from .job import logged


def attach(pid: int, job: str, limits: Limits, intent: str | None, force: bool, store: Store) -> Result:
    check_adoptable(pid)
    return asyncio.run(_attach(pid, job, limits, intent, force, store))


async def _attach(
    pid: int, job: str, limits: Limits, intent: str | None, force: bool, store: Store
) -> Result:
    buses: list[Bus] = []

    async def connect() -> Bus:  # under the lock, as it always was
        if not buses:
            buses.append(await Bus.connect())
        return buses[0]

    loop = asyncio.get_running_loop()
    stopped: list[int] = []  # a stop signal detaches: the workload runs on (one during the move: after it)
    watch: list[Watch] = []
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, lambda sig: watch[0].detach(sig) if watch else stopped.append(sig), sig)
    try:
        said: list[tuple[int, str]] = []  # said once the journal's entries are tied to the scope
        j = await adopt(
            connect, store, job, pid, limits, intent, force, os.getpid(), None, lambda *s: said.append(s)
        )
        watch.append(j.w)
        for first in stopped[:1]:
            j.w.detach(first)
        journal.bind_unit(j.c.unit, pid)
        for line in said:
            logged(*line)
        j.say = logged
        result = await end(j, buses[0], (None, None), None)
        assert result is not None
        return result
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        for bus in buses:
            bus.close()
