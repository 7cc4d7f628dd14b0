"""Run mode: fork, put the waiting child into a new scope, let it exec, observe it. Fork/exec path ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime

from ..errors import RUN_CANNOT_EXECUTE, RUN_NOT_FOUND, RUN_WRAPPER_ERROR, FfrtmpError, StateError
from ..limits import Limits
from ..observe.watch import Watch
from ..report.result import Contract, Mode, Result
from ..report.store import Store
from ..systemd.bus import Bus, BusError
from .job import contract, finish, mark_governed, start_scope, unenforced

log = logging.getLogger(__name__)
GO, ABORT = b"g", b"x"


def _child(cmd: list[str], go: int, report: int) -> None:
    try:
        os.setpgid(0, 0)
        if os.read(go, 1) == ABORT:
            os._exit(RUN_WRAPPER_ERROR)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored by Python at its start, not by a shell
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(cmd[0], cmd)
    except (OSError, ValueError) as err:  # ValueError: an empty command name, not found
        num = getattr(err, "errno", None) or errno.ENOENT
        os.write(report, str(num).encode())
        os._exit(RUN_NOT_FOUND if num == errno.ENOENT else RUN_CANNOT_EXECUTE)
    finally:
        os._exit(RUN_WRAPPER_ERROR)


def _take_terminal(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(0, pid)
            return 0
    return None


def run(
    cmd: list[str], job: str, limits: Limits, intent: str | None, store: Store
) -> tuple[Result | None, int]:
    go_r, go = os.pipe()
    report_r, report = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go)
        os.close(report_r)
        _child(cmd, go_r, report)
    os.close(go_r)
    os.close(report)
    went = claimed = False
    pipes = [go, report_r]

    def let_go() -> None:
        nonlocal went
        went = True
        with contextlib.suppress(BrokenPipeError):  # killed before its exec (its scope stopped): observed
            os.write(go, GO)
        os.close(go)

    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    tty = _take_terminal(pid)
    try:
        c = contract(job, Mode.RUN, pid, limits, intent, datetime.now(UTC), command=cmd)
        try:
            store.claim(c)
            claimed = True
        except StateError as err:  # disk trouble fails the record, never the workload: run it, governed
            log.error("ffrtmp: job %s: contract not saved, the workload runs all the same: %s", job, err)
        return asyncio.run(_govern(c, let_go, report_r, store))
    except Exception as err:  # before the go the child is stopped (125 is true); after it, never 125
        if went and isinstance(err, FfrtmpError):
            raise
        if went:
            log.error("ffrtmp: job %s: observation failed, waiting for the workload: %r", job, err)
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            return None, status if status >= 0 else 128 - status
        with contextlib.suppress(BrokenPipeError):  # the child is gone already
            os.write(go, ABORT)
        os.waitpid(pid, 0)
        while pipes:  # closed now: dropping the contract needs descriptors under a low `ulimit -n`
            os.close(pipes.pop())
        if claimed:
            with contextlib.suppress(FfrtmpError):
                store.drop_contract(job)
        why = str(err) if isinstance(err, FfrtmpError) else f"job {job} not started: {err}"
        raise FfrtmpError(why, RUN_WRAPPER_ERROR) from None
    finally:
        while pipes and not went:  # else closed as soon as done with: few are left under a low `ulimit -n`
            os.close(pipes.pop())
        if tty is not None:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(tty, os.getpgrp())


async def _govern(c: Contract, let_go: Callable[[], None], report: int, store: Store) -> tuple[Result, int]:
    w = Watch(c.pid)
    bus: Bus | None = None
    error: str | None = None
    try:
        try:
            bus = await Bus.connect()
            await start_scope(bus, c, [c.pid])
        except BusError as err:
            if err.name == "org.freedesktop.systemd1.UnitExists":
                raise FfrtmpError(f"unit {c.unit} already exists: job id {c.job_id!r} is taken") from None
            error = str(err)
        if error is None and bus is not None:
            with contextlib.suppress(BusError):  # before the exec, so that no early event is missed
                await w.follow(bus, c.unit)
        let_go()
        failed = await asyncio.to_thread(os.read, report, 16)  # b"": the exec closed it; the loop runs on
        os.close(report)
        if failed:
            store.drop_contract(c.job_id)
            os.waitpid(c.pid, 0)
            num = int(failed)
            status = RUN_NOT_FOUND if num == errno.ENOENT else RUN_CANNOT_EXECUTE
            raise FfrtmpError(f"cannot execute {c.command[0]!r}: {os.strerror(num)}", status)  # type: ignore[index]
        started = datetime.now(UTC)
        note = None
        if error is None and bus is not None:
            mark_governed(store, c)
            log.info("ffrtmp: job %s started in %s (pid %d)", c.job_id, c.unit, c.pid)
            note = await unenforced(bus, c)
        else:
            log.warning("ffrtmp: job %s runs UNGOVERNED (pid %d): %s", c.job_id, c.pid, error)
        await w.wait()
        code = sig = None
        if w.stop_signal is None:  # the pidfd said it exited: this does not block
            status = os.waitstatus_to_exitcode(os.waitpid(c.pid, 0)[1])
            code, sig = (status, None) if status >= 0 else (None, -status)
        result = await finish(store, c, w, bus, error, (code, sig), w.active_since or started, note=note)
        return result, code if code is not None else 128 + (sig or w.stop_signal or 0)
    finally:  # on every path; after finish() nothing is left to close
        w.close()
        if bus is not None:
            bus.close()
