"""Observation of one job: PID exit, unit state, OOM events, stop requests; timestamps. ONLY.

Event-driven: a pidfd, systemd's PropertiesChanged, the memory controller's OOM eventfd and
signal handlers wake the loop; nothing polls.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..systemd.bus import Bus, BusError, in_order

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MEMCG_V1 = Path("/sys/fs/cgroup/memory")
SCOPE = "org.freedesktop.systemd1.Scope"
SETTLE = 2.0  # how long to wait, after the main process exited, for systemd to report the scope inactive


def from_usec(usec: int | None) -> datetime | None:
    return datetime.fromtimestamp(usec / 1e6, UTC) if usec else None


class Watch:
    """Everything seen about one job while it runs. `wait()` returns when the process exits or on a stop."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.stop_signal: int | None = None  # set when told to stop observing (detach)
        self.lost = self.oom = False
        self.unit: dict[str, Any] = {}  # last known Unit properties
        self.blind: str | None = None  # why the unit's end went unseen (its bus connection dropped)
        self._done = asyncio.Event()
        self._inactive = asyncio.Event()
        self._memcg: Path | None = None
        self._path: str | None = None  # the unit's object path, once followed
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pidfd, self._done.set)
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop, sig)

    def exited(self) -> bool:
        return _readable(self.pidfd)

    def _stop(self, sig: int) -> None:
        self.stop_signal = sig
        self._done.set()

    async def follow(self, bus: Bus, unit: str) -> None:
        """Follow the unit's state and its memory cgroup's OOM events (hybrid/v1 hosts)."""
        self._path = path = await bus.unit_path(unit)
        # The match before the reads: a change after them is heard, one before them is in them.
        _, props, cgroup = await in_order(
            bus.watch(path, self._on_change), bus.properties(path), bus.get(path, SCOPE, "ControlGroup")
        )
        self._on_change(props)
        if cgroup and (MEMCG_V1 / cgroup.lstrip("/")).is_dir():
            self._watch_oom(MEMCG_V1 / cgroup.lstrip("/"))

    def _on_change(self, changed: dict[str, Any]) -> None:
        self.unit.update(changed)
        state = changed.get("ActiveState")
        if state == "deactivating":  # a stop was asked for: scopes that empty by themselves skip this state
            self.lost = True
        elif state in ("inactive", "failed"):
            self.lost = (
                self.lost or not self.exited()
            )  # emptied while our process still ran: it was moved out
            self._inactive.set()

    def _watch_oom(self, memcg: Path) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ofd = os.open(memcg / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            (memcg / "cgroup.event_control").write_text(f"{efd} {ofd}")
        finally:
            os.close(ofd)
        self._memcg = memcg
        asyncio.get_running_loop().add_reader(efd, self._on_oom, efd)

    def _on_oom(self, efd: int) -> None:
        # The eventfd wakes on an OOM in the cgroup and when the cgroup is removed. At an OOM wake the
        # kill has not happened yet (oom_kill still reads 0), but the directory is still there.
        with contextlib.suppress(OSError):
            os.eventfd_read(efd)
        if self._memcg is not None and self._memcg.is_dir():
            self.oom = True
        else:
            asyncio.get_running_loop().remove_reader(efd)
            os.close(efd)

    async def wait(self) -> None:
        await self._done.wait()

    async def settle(self, bus: Bus | None, unit: str) -> None:
        """After the exit: give systemd a moment to report the scope inactive, then read its result."""
        if bus is not None and bus.connected and self.unit:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._inactive.wait(), SETTLE)
            with contextlib.suppress(BusError):
                path = self._path or await bus.unit_path(unit)
                props, result = await in_order(bus.properties(path), bus.get(path, SCOPE, "Result"))
                self.unit.update(props)
                if result == "oom-kill":
                    self.oom = True  # systemd knows this on unified (v2) hosts
        if bus is not None and bus.lost and not self._inactive.is_set():  # no reconnect: DO LESS
            self.blind = f"observation of {unit} lost, end time is the exit as seen here: {bus.lost}"

    @property
    def active_since(self) -> datetime | None:
        return from_usec(self.unit.get("ActiveEnterTimestamp"))

    @property
    def inactive_since(self) -> datetime | None:
        return from_usec(self.unit.get("InactiveEnterTimestamp")) if self._inactive.is_set() else None

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.pidfd)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        os.close(self.pidfd)


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
