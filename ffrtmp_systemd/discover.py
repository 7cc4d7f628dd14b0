"""Watch mode: new processes (exec events, and one /proc pass at start) matched to the rules, each match
handed once per process to the one adoption hook. Deciding and dispatching ONLY: the adoption is attach's."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from .names import watch_job_id
from .proc import identity
from .procevents import Event, Exec, Exit, Lost, ProcEvents
from .report.store import Store
from .rules import Process, Rule, Rules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A process a rule matched: what the adoption needs."""

    rule: Rule
    process: Process
    job_id: str
    force: bool  # it is in the .service its rule names: adopt it from there (cannot be undone)


Adopt = Callable[[Candidate], Awaitable[None]]


def unit_of(cgroup: str) -> str | None:
    """The unit of a /proc/PID/cgroup text, as systemd derives it: the first path component that is not a
    slice, if it is a unit that holds processes; None for the root cgroup or a path outside our view."""
    lines = [ln.split(":", 2) for ln in cgroup.splitlines() if ln.count(":") >= 2]
    path = next((p for _, c, p in lines if c == "name=systemd"), None)  # v1 and hybrid: systemd's own
    path = path or next((p for n, c, p in lines if n == "0" and c == ""), "/")
    part = next((x for x in path.split("/") if x and not x.endswith(".slice")), "")
    return part if part.endswith((".service", ".scope")) else None


def facts(pid: int, rules: Rules) -> Process | None:
    """What the rules are matched against; None if no rule can want this executable, or the process is
    gone, a kernel thread, a zombie or unreadable (never guessed)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        if not rules.wants(exe):
            return None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        uid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Uid:")))
    except (OSError, ValueError, StopIteration):
        return None
    ident = identity(pid)
    if ident is None:
        return None
    args = cmdline[:-1] if cmdline.endswith(b"\0") else cmdline
    argv = tuple(a.decode(errors="surrogateescape") for a in args.split(b"\0")) if args else ()
    return Process(pid, exe, argv, uid, unit_of(cgroup), int(ident.rpartition(":")[2]))


class Watcher:
    """Hands every process a rule matches to `adopt`, once per process (PID and start time), whether it
    is seen by its exec event, by the /proc pass, or by both. `exited` gets every process's exit event
    (for the record of a job it adopted: the real exit status)."""

    def __init__(self, rules: Rules, adopt: Adopt, exited: Callable[[Exit], None] | None = None) -> None:
        self.rules = rules
        self._adopt, self._exited = adopt, exited
        self._seen: dict[int, int] = {}  # PID -> start ticks of a process handed to adopt
        self._tasks: set[asyncio.Task[None]] = set()

    def consider(self, pid: int) -> Candidate | None:
        """Dispatch `pid` if a rule matches it and it was not dispatched before; the candidate, or None."""
        p = facts(pid, self.rules)
        rule = self.rules.match(p) if p is not None else None
        if p is None or rule is None or self._seen.get(pid) == p.start_ticks:
            return None
        self._seen[pid] = p.start_ticks
        c = Candidate(
            rule, p, watch_job_id(rule.name, pid, p.start_ticks), (p.unit or "").endswith(".service")
        )
        log.info("ffrtmp: watch: rule %s matched PID %d (%s): job %s", rule.name, pid, p.exe, c.job_id)
        task = asyncio.get_running_loop().create_task(self._run(c))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return c

    async def _run(self, c: Candidate) -> None:
        try:
            await self._adopt(c)
        except Exception as err:  # one job's failure is its own line; watching goes on
            log.warning("ffrtmp: watch: job %s (PID %d) not adopted: %s", c.job_id, c.process.pid, err)

    def scan(self) -> None:
        """One pass over /proc: the matching processes that are already running."""
        with os.scandir("/proc") as entries:
            for entry in entries:
                if entry.name.isdigit():
                    self.consider(int(entry.name))

    def on_events(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Exec):
                self.consider(e.pid)
            elif isinstance(e, Exit):
                self._seen.pop(e.pid, None)
                if self._exited is not None:
                    self._exited(e)
            elif isinstance(e, Lost):  # events were dropped: what started meanwhile is in /proc
                log.warning("ffrtmp: watch: process events were lost; looking at /proc again")
                self.scan()


def attach_command(store: Store) -> Adopt:
    """THE ADOPTION HOOK of the foreground `ffrtmp watch`, until the agent's attach coroutine replaces it:
    `ffrtmp attach` of the candidate, a process in its own session (stopping watch stops no attach).
    Its lines (start, refusal, summary) are its own; its exit status is logged here."""

    async def adopt(c: Candidate) -> None:
        argv = [sys.executable, "-m", "ffrtmp_systemd", "attach", "--pid", str(c.process.pid)]
        argv += ["--job-id", c.job_id, "--state-dir", str(store.state_dir), *c.rule.attach_args]
        proc = subprocess.Popen(
            [*argv, *(["--force"] if c.force else [])], stdin=subprocess.DEVNULL, start_new_session=True
        )
        loop, fd = asyncio.get_running_loop(), os.pidfd_open(proc.pid)
        done = loop.create_future()
        loop.add_reader(fd, done.set_result, None)
        try:
            await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        if (code := proc.wait()) != 0:
            log.warning("ffrtmp: watch: attach of job %s exited %d", c.job_id, code)

    return adopt


def watch(rules: Rules, store: Store) -> int:
    return asyncio.run(_watch(rules, store))


async def _watch(rules: Rules, store: Store) -> int:
    source = ProcEvents()  # subscribed before the /proc pass: nothing starts unseen in between
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        w = Watcher(rules, attach_command(store))
        source.listen(loop, w.on_events)
        w.scan()
        log.info("ffrtmp: watch: %d rules of %s, listening to process events", len(rules.rules), rules.path)
        await stop.wait()
    finally:
        source.close()
        with contextlib.suppress(Exception):
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    return 0
