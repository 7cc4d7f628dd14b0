"""Observation of one job: PID exit, unit state, OOM events, stop requests; timestamps. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import select
from datetime import datetime
from pathlib import Path
from typing import Any

from ..systemd.bus import SCOPE, Bus, BusError, in_order, stamp

MEMCG_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")
IN_MODIFY = 0x2
# The unit properties a record needs: all a watch keeps (a host of 1,000 jobs keeps little)
KEPT = ("ActiveState", *(f"{s}EnterTimestamp{m}" for s in ("Active", "Inactive") for m in ("", "Monotonic")))
SETTLE = 2.0  # s, after the exit, for systemd to report the scope inactive


def _inotify(path: Path) -> int:
    """An fd readable when the kernel changes `path` (cgroup v2 files notify on change); -1 if none."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd: int = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
        os.close(fd)
        return -1
    return fd


class Watch:
    def __init__(self, pid: int) -> None:
        self.pidfd = os.pidfd_open(pid)
        self.stop_signal: int | None = None
        self.lost = self.oom = False
        self.unit: dict[str, Any] = {}
        self.blind: str | None = None  # why the unit's end went unseen (its bus connection dropped)
        self._done = asyncio.Event()
        self._inactive = asyncio.Event()
        self._memcg: Path | None = None
        self._efds: list[int] = []
        self._events = 0
        self._removed = asyncio.Event()
        self._v2_events: Path | None = None  # v2: the scope's memory.events
        self._ifd = -1  # v2: inotify on it
        self._kmsg = -1  # v2: the kernel's log, read only if the cgroup goes before its counter is read
        self._cgroup = ""
        self._path: str | None = None
        self._bus: Bus | None = None
        asyncio.get_running_loop().add_reader(self.pidfd, self._exit)

    def exited(self) -> bool:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def _exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfd)  # it stays readable: left in, the loop spins
        self._oom_kills()  # the kernel notifies late (rate-limited): read now, while the cgroup may still be
        self._done.set()

    def detach(self, sig: int) -> None:
        """Stop waiting (the client's Detach, a watch's stop signal); after the exit (the settle): nothing."""
        if not self.exited():
            self.stop_signal = sig
            self._done.set()

    async def follow(self, bus: Bus, unit: str) -> None:
        self._path = path = await bus.unit_path(unit)
        self._bus = bus
        # The match before the reads: a change after them is heard, one before them is in them.
        _, props, cgroup = await in_order(
            bus.watch(path, self._on_change),
            bus.properties(path),
            bus.get(path, SCOPE, "ControlGroup"),
        )
        self._on_change(props)
        rel = (cgroup or "/").lstrip("/")
        if rel and (MEMCG_V1 / rel).is_dir():  # hybrid/v1 hosts
            with contextlib.suppress(OSError):  # no OOM watch is no reason to stop
                self._watch_oom(MEMCG_V1 / rel)
        elif rel and (CGROUP_V2 / rel / "memory.events").is_file():  # unified (v2)
            self._v2_events, self._cgroup = CGROUP_V2 / rel / "memory.events", cgroup
            with contextlib.suppress(OSError):  # root only; none: only the counter can tell
                self._kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                os.lseek(self._kmsg, 0, os.SEEK_END)  # what the kernel logs from now on
            self._ifd = _inotify(self._v2_events)  # -1: only the reads at the exit remain
            if self._ifd >= 0:
                asyncio.get_running_loop().add_reader(self._ifd, self._on_events)
            self._oom_kills()

    def _on_change(self, changed: dict[str, Any]) -> None:
        self.unit.update((k, changed[k]) for k in KEPT if k in changed)
        state = changed.get("ActiveState")
        if state == "deactivating":  # a stop was asked for: scopes that empty by themselves skip this state
            self.lost = True
        elif state in ("inactive", "failed"):
            self.lost = self.lost or not self.exited()  # emptied while our process ran: it was moved out
            self._inactive.set()

    def _watch_oom(self, memcg: Path) -> None:
        # memory.oom_control signals its eventfd on an OOM (before the kill) and once when the cgroup is
        # removed, which systemd may do before we read. A usage threshold never reached signals only that
        # removal; registered first, the kernel signals it after the other one's.
        for name, arg in (("memory.usage_in_bytes", " -1"), ("memory.oom_control", "")):
            self._efds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            ofd = os.open(memcg / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                (memcg / "cgroup.event_control").write_text(f"{self._efds[-1]} {ofd}{arg}")
            finally:
                os.close(ofd)
        self._memcg = memcg
        asyncio.get_running_loop().add_reader(self._efds[0], self._on_removed)
        asyncio.get_running_loop().add_reader(self._efds[1], self._on_oom)

    def _on_removed(self) -> None:
        asyncio.get_running_loop().remove_reader(self._efds[0])
        self._removed.set()

    def _on_oom(self) -> None:
        with contextlib.suppress(OSError):
            self._events += os.eventfd_read(self._efds[1])
        if self._memcg is not None and (self._memcg.is_dir() or self._events > 1):  # > 1: OOM and removal
            self.oom = True

    def _oom_kills(self) -> None:
        """v2: the kernel's own counter; our scope's cgroup is new, so any kill counted is in this job."""
        if self._v2_events is None:
            return
        try:
            m = re.search(r"^oom_kill (\d+)$", self._v2_events.read_text(), re.M)
        except OSError:  # systemd removed the cgroup first (a job whose last process was the victim)
            self.oom = self.oom or self._logged_kill()
            return
        self.oom = self.oom or bool(m and int(m[1]) > 0)

    def _logged_kill(self) -> bool:
        """Whether the kernel logged an OOM kill of a task of our scope since `follow` (its `oom-kill:` line
        names the victim's cgroup). Read once, to the end of the log; no time or guess involved."""
        fd, self._kmsg = self._kmsg, -1
        victim = re.compile(rb"\btask_memcg=" + re.escape(self._cgroup.encode()) + rb"[,/]")
        try:
            while fd >= 0:
                try:
                    if victim.search(os.read(fd, 8192).partition(b";")[2]):
                        return True
                except BrokenPipeError:  # a record overwritten while we read: the next one follows
                    continue
        except OSError:  # EAGAIN: the end of the log
            pass
        finally:
            if fd >= 0:
                os.close(fd)
        return False

    def _on_events(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._ifd, 4096)  # drained; the file itself says what changed
        self._oom_kills()
        if self._v2_events is not None and not self._v2_events.exists():  # the cgroup was removed
            self._unwatch()

    def _unwatch(self) -> None:
        if self._ifd >= 0:
            asyncio.get_running_loop().remove_reader(self._ifd)
            os.close(self._ifd)
            self._ifd = -1

    async def wait(self) -> None:
        await self._done.wait()

    async def settle(self, bus: Bus | None, unit: str) -> None:
        self._oom_kills()
        if bus is not None and bus.connected and self.unit and (path := self._path):  # followed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._inactive.wait(), SETTLE)
            with contextlib.suppress(BusError):
                props, result = await in_order(bus.properties(path), bus.get(path, SCOPE, "Result"))
                self._on_change(props)
                if result == "oom-kill":
                    self.oom = True  # systemd knows this on unified (v2) hosts
        if self._memcg is not None and self._inactive.is_set():  # v1: count again once the removal is heard
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._removed.wait(), SETTLE)
            self._on_oom()
        if bus is not None and bus.lost and not self._inactive.is_set():  # no reconnect: DO LESS
            self.blind = f"observation of {unit} lost, end time is the exit as seen here: {bus.lost}"

    @property
    def active_since(self) -> datetime | None:
        return stamp(self.unit.get("ActiveEnterTimestamp"))

    @property
    def inactive_since(self) -> datetime | None:
        return stamp(self.unit.get("InactiveEnterTimestamp")) if self._inactive.is_set() else None

    def seconds(self, since_usec: int | None = None) -> float | None:
        """Monotonic span to the scope's end, from its activation or from `since_usec` (µs since boot)."""
        start = since_usec or self.unit.get("ActiveEnterTimestampMonotonic")
        end = self.unit.get("InactiveEnterTimestampMonotonic") if self._inactive.is_set() else None
        return max(0, end - start) / 1e6 if start and end else None

    def close(self) -> None:
        """Every descriptor and handler freed; again: nothing."""
        if self.pidfd < 0:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.pidfd)
        for fd in self._efds:
            loop.remove_reader(fd)
            os.close(fd)
        os.close(self.pidfd)
        self.pidfd = -1
        if self._bus is not None and self._path is not None:  # a shared bus hears no more for it
            self._bus.unwatch(self._path)
        self._efds.clear()
        self._unwatch()
        if self._kmsg >= 0:
            os.close(self._kmsg)
            self._kmsg = -1
