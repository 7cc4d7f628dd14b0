"""The kernel's process events (netlink connector, CN_IDX_PROC): exec and exit of every process, the exit
with its status. Listening ONLY; standard library only."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import FfrtmpError

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
PROC_EVENT_EXEC, PROC_EVENT_EXIT = 0x00000002, 0x80000000
NLMSG_DONE = 3
# The kernel's own inode numbers of the initial namespaces (include/linux/proc_ns.h): events are sent only
# to listeners in both, with PIDs as the initial PID namespace sees them.
PROC_PID_INIT_INO, PROC_USER_INIT_INO = 0xEFFFFFFC, 0xEFFFFFFD
NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns (CLOCK_MONOTONIC)
EXEC = struct.Struct("=II")  # pid, tgid
EXIT = struct.Struct("=IIII")  # pid, tgid, exit_code (a wait status), exit_signal (to the parent)
RCVBUF = 8 << 20  # a burst of execs on a busy node must not overflow the socket
BATCH = 64  # datagrams (events) per wakeup of a listener: a burst takes turns with the loop's other work


@dataclass(frozen=True)
class Exec:
    pid: int  # the process (thread group) that called execve, as the init PID namespace numbers it
    at_ns: int  # when, on CLOCK_MONOTONIC


@dataclass(frozen=True)
class Exit:
    pid: int  # the process: the event of its thread group leader
    exit_code: int | None  # exit(N); None when a signal ended it
    signal: int | None
    at_ns: int


@dataclass(frozen=True)
class Lost:
    """The socket overflowed: events were dropped (whoever needs all of them must look at /proc again)."""


Event = Exec | Exit | Lost


class Unavailable(FfrtmpError):
    """Process events cannot be had here: one line saying why."""


def why_unavailable() -> str | None:
    """Why this process cannot listen, or None. The kernel silently ignores a listener outside the initial
    PID or user namespace (a container, the namespace sandbox): that is checked first, by inode."""
    try:
        pid_ns, user_ns = (os.stat(f"/proc/self/ns/{n}").st_ino for n in ("pid", "user"))
    except OSError as err:
        return f"cannot read this process's namespaces: {err.strerror}"
    if pid_ns != PROC_PID_INIT_INO or user_ns != PROC_USER_INIT_INO:
        return "this process is not in the host's initial PID and user namespaces (a container or a sandbox)"
    if os.geteuid() != 0:
        return "it needs root (CAP_NET_ADMIN)"
    return None


class ProcEvents:
    """A subscription to exec and exit events. `read()` never blocks; `listen()` calls back from an
    asyncio loop whenever events arrive (add_reader: no polling)."""

    def __init__(self) -> None:
        if (why := why_unavailable()) is not None:
            raise Unavailable(f"process events unavailable: {why}")
        try:
            self._sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR
            )
        except OSError as err:  # the connector lives in the initial network namespace only
            raise Unavailable(
                f"process events unavailable: no netlink connector here ({err.strerror})"
            ) from None
        try:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
            self._sock.bind((0, CN_IDX_PROC))
            self._op(PROC_CN_MCAST_LISTEN)
            self._sock.setblocking(False)
        except OSError as err:
            self._sock.close()
            raise Unavailable(f"process events unavailable: {err.strerror}") from None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _op(self, op: int) -> None:
        data = struct.pack("=I", op)
        cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(data), 0) + data
        self._sock.send(NLMSG.pack(NLMSG.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn)

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, most: int = -1) -> list[Event]:
        """Every event waiting now (of the first `most` datagrams only, if given), in the kernel's order."""
        out: list[Event] = []
        while most != 0:
            most -= 1
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                out.append(Lost())
                continue
            out += parse(data)
        return out

    def listen(self, loop: asyncio.AbstractEventLoop, callback: Callable[[list[Event]], None]) -> None:
        self._loop = loop
        loop.add_reader(self.fileno(), lambda: callback(self.read(BATCH)))  # the rest: at the next wakeup

    def close(self) -> None:
        """Unsubscribe and close; again: nothing."""
        if self._sock.fileno() < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.fileno())
        with contextlib.suppress(OSError):
            self._op(PROC_CN_MCAST_IGNORE)
        self._sock.close()


def parse(data: bytes) -> list[Event]:
    """The exec and exit events (of processes, not threads) in one datagram of netlink messages."""
    out: list[Event] = []
    off = 0
    while off + NLMSG.size <= len(data):
        length = NLMSG.unpack_from(data, off)[0]
        if length < NLMSG.size:
            break
        body = off + NLMSG.size + CN_MSG.size
        if body + EVENT.size <= off + length:
            what, _cpu, at = EVENT.unpack_from(data, body)
            rest = body + EVENT.size
            if what == PROC_EVENT_EXEC:
                _pid, tgid = EXEC.unpack_from(data, rest)
                out.append(Exec(tgid, at))
            elif what == PROC_EVENT_EXIT:
                pid, tgid, status, _sig = EXIT.unpack_from(data, rest)
                if pid == tgid:
                    code, sig = (None, status & 0x7F) if status & 0x7F else (status >> 8 & 0xFF, None)
                    out.append(Exit(tgid, code, sig, at))
        off += (length + 3) & ~3
    return out
