"""What /proc says about a process: may it be adopted, its descendants, its start time. Reading ONLY.
Standard library only, none of its heavier modules (pathlib, datetime at import): the thin client uses it."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import os

from .errors import FfrtmpError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from datetime import datetime

PF_KTHREAD = 0x00200000


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    text = _read(f"/proc/{pid}/stat")
    return text[text.rindex(")") + 2 :].split()


def _tgid(pid: int) -> int:
    """The process (thread group) that the task `pid` belongs to: itself unless it is a thread."""
    status = _read(f"/proc/{pid}/status")
    return next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("Tgid:"))


def check_adoptable(pid: int, me: int = 0) -> None:
    """Refuse what must never be adopted: PID 1, threads, the wrapper `me` (default this process) or its
    ancestors, kthreads, zombies."""
    if pid <= 0:
        raise UsageError(f"invalid PID {pid}: must be a positive number")
    if pid == 1:
        raise FfrtmpError("refusing PID 1: the init process cannot be adopted")
    try:
        fields, tgid = _stat(pid), _tgid(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise FfrtmpError(f"no process with PID {pid}") from None
    if tgid != pid:
        raise FfrtmpError(f"refusing PID {pid}: it is a thread of process {tgid}, not a process")
    me = me or os.getpid()
    while me > 1:
        if me == pid:
            raise FfrtmpError(f"refusing PID {pid}: it is this wrapper or one of its ancestors")
        me = int(_stat(me)[1])
    if int(fields[6]) & PF_KTHREAD:
        raise FfrtmpError(f"refusing PID {pid}: it is a kernel thread")
    if fields[0] in ("Z", "X"):
        raise FfrtmpError(f"refusing PID {pid}: it has already exited (zombie)")


def parent(pid: int) -> int:
    """The PID of a process's parent; 0 if it cannot be read (gone)."""
    try:
        return int(_stat(pid)[1])
    except (OSError, ValueError, IndexError):
        return 0


def descendants(pid: int) -> list[int]:
    """The PIDs of every current descendant of `pid`, parents first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = []
        with contextlib.suppress(OSError):  # each thread's children: a child of a thread is in its file only
            for task in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(OSError):
                    kids += [int(k) for k in _read(f"/proc/{parent}/task/{task}/children").split()]
        out += kids
        todo += kids
    return out


def boot_time() -> datetime:
    from datetime import UTC, datetime

    btime = next(ln for ln in _read("/proc/stat").splitlines() if ln.startswith("btime"))
    return datetime.fromtimestamp(int(btime.split()[1]), UTC)


def since_boot_usec(pid: int) -> int:
    """When the process started, in µs since boot (its stat start time)."""
    return int(_stat(pid)[19]) * 10**6 // os.sysconf("SC_CLK_TCK")


def start_time(pid: int) -> datetime:
    """When the process started (its stat start time, on the realtime clock)."""
    from datetime import timedelta

    return boot_time() + timedelta(microseconds=since_boot_usec(pid))


def identity(pid: int) -> str | None:
    """What tells this process from every other that had or will have its PID: "BOOT_ID:START_TICKS".
    None if no live process has this PID (a thread's id, a zombie and nothing at all are none)."""
    try:
        fields = _stat(pid)
        tgid = _tgid(pid) == pid
        boot = _read("/proc/sys/kernel/random/boot_id").strip()
    except (OSError, ValueError):
        return None
    return f"{boot}:{fields[19]}" if tgid and fields[0] not in ("Z", "X") else None
