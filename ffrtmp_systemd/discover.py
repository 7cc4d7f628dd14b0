"""Watch mode: new processes (exec events, and one /proc pass at start) matched to the rules, each match
handed once per process to the one adoption hook. Deciding and dispatching ONLY: the adoption is attach's."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .agent import Host
from .errors import FfrtmpError
from .names import printable, watch_job_id
from .proc import check_adoptable, identity
from .procevents import Event, Exec, Exit, Lost, ProcEvents
from .report.store import Store
from .rules import MAX_ARGV, Process, Rule, Rules
from .systemd.bus import Bus, BusError
from .wrapper import govern
from .wrapper.job import logged

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Candidate:
    """A process a rule matched: what the adoption needs."""

    rule: Rule
    process: Process
    job_id: str
    force: bool  # it is in the .service its rule names: adopt it from there (cannot be undone)
    exec_ns: int | None = None  # when it exec'd (CLOCK_MONOTONIC) by its exec event; None: the /proc pass


Adopt = Callable[[Candidate], Awaitable[None]]
Status = tuple[int | None, int | None]  # (exit code, signal)
Stop = asyncio.Future[int]  # the stop signal


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
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read(MAX_ARGV)  # what a rule sees: bounded, whatever its owner put there
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
    is seen by its exec event, by the /proc pass, or by both. `exited` gets every process's exit event.
    The exit events of the PIDs it adopts, and of those `expect`ed (the agent's attach jobs, its resumed
    jobs), are kept for their jobs' records: the real exit status."""

    def __init__(
        self,
        rules: Rules,
        adopt: Adopt,
        source: ProcEvents | None = None,
        exited: Callable[[Exit], None] | None = None,
    ) -> None:
        self.rules = rules
        self._adopt, self._source, self._exited = adopt, source, exited
        self._seen: dict[int, int] = {}  # PID -> start ticks of a process handed to adopt
        self._expected: Counter[int] = Counter()  # PIDs whose jobs will want their exit status (how many)
        self._exits: dict[int, Exit] = {}  # the exit events of those, until their jobs are done
        self.tasks: set[asyncio.Task[None]] = set()

    def consider(self, pid: int, exec_ns: int | None = None) -> Candidate | None:
        """Dispatch `pid` if a rule matches it and it was not dispatched before; the candidate, or None."""
        p = facts(pid, self.rules)
        rule = self.rules.match(p) if p is not None else None
        if p is None or rule is None or self._seen.get(pid) == p.start_ticks:
            return None
        self._seen[pid] = p.start_ticks
        c = Candidate(
            rule, p, watch_job_id(rule.name, pid, p.start_ticks), (p.unit or "").endswith(".service"), exec_ns
        )
        exe = printable(p.exe)  # anyone names directories: one line in the journal, whatever is in it
        log.info("ffrtmp: watch: rule %s matched PID %d (%s): job %s", rule.name, pid, exe, c.job_id)
        self._expected[pid] += 1  # from now: its exit event may follow in this very batch
        task = asyncio.get_running_loop().create_task(self._run(c))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return c

    async def _run(self, c: Candidate) -> None:
        try:
            await self._adopt(c)
        except Exception as err:  # one job's failure is its own line; watching goes on
            log.warning("ffrtmp: watch: job %s (PID %d) not adopted: %s", c.job_id, c.process.pid, err)
        finally:
            self.forget(c.process.pid)

    def expect(self, pid: int) -> None:
        """Keep the exit event of `pid` (a live process a job pins) until `forget`. The events already in
        the socket are read first: an earlier holder of the PID's exit is never taken for this one's."""
        self._read()
        self._expected[pid] += 1

    def forget(self, pid: int) -> None:
        self._expected[pid] -= 1
        if self._expected[pid] <= 0:
            del self._expected[pid]
            self._exits.pop(pid, None)

    def _read(self) -> None:
        if self._source is not None:
            try:
                events = self._source.read()
            except OSError as err:  # closed (the bus was lost): no status, as where there is no source
                log.debug("ffrtmp: watch: process events not read: %s", err)
                return
            self.on_events(events)

    def exit_status(self, pid: int) -> Status:
        """(exit code, signal) of a dispatched process that has ended, from its exit event: the kernel sends
        that before it wakes the process's pidfd, so once the pidfd said so it is in the socket, read here
        (None, None: events were lost, or it was not expected)."""
        self._read()
        e = self._exits.get(pid)
        return (None, None) if e is None else (e.exit_code, e.signal)

    def scan(self) -> None:
        """One pass over /proc: the matching processes that are already running."""
        with os.scandir("/proc") as entries:
            for entry in entries:
                if entry.name.isdigit():
                    self.consider(int(entry.name))

    def on_events(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Exec):
                self.consider(e.pid, e.at_ns)
            elif isinstance(e, Exit):
                self._seen.pop(e.pid, None)
                if e.pid in self._expected:
                    self._exits.setdefault(e.pid, e)  # the first: a later one is a reused PID's
                if self._exited is not None:
                    self._exited(e)
            elif isinstance(e, Lost):  # events were dropped: what started meanwhile is in /proc
                log.warning("ffrtmp: watch: process events were lost; looking at /proc again")
                self.scan()


async def adopt(host: Host, store: Store, c: Candidate, status: Callable[[int], Status], stop: Stop) -> None:
    """THE ADOPTION of a candidate: attach's own (govern.adopt: same refusals, scope, contract; this process
    is the job's wrapper), observed to its end and frozen once with the exit status `status` gives. A stop
    signal detaches it, as it does an attach."""
    pid = c.process.pid
    check_adoptable(pid)  # nor this process, nor its ancestors
    # Still the process the rule matched, not another with its PID: govern.adopt pins it (pidfd) before
    # its first await, so nothing runs in between.
    if (now := identity(pid)) is None or int(now.rpartition(":")[2]) != c.process.start_ticks:
        raise FfrtmpError(f"PID {pid} has exited")
    with host.being_made(c.job_id):  # the Reconciler leaves it alone from its contract on
        j = await govern.adopt(
            host.connect,
            store,
            c.job_id,
            pid,
            c.rule.limits,
            c.rule.intent,
            c.force,
            os.getpid(),
            host.lock,
            logged,
            f"watch:{c.rule.name}",
        )
        host.add(j)
    if c.exec_ns is not None:
        ms = (time.monotonic_ns() - c.exec_ns) / 1e6
        log.info("ffrtmp: watch: job %s governed %.1f ms after its exec", c.job_id, ms)
    if stop.done():  # during the move
        j.w.detach(stop.result())
    await j.w.wait()  # its end (pidfd), or detached
    await host.finish(j, status(pid) if j.w.exited() else (None, None), None)


def watch(rules: Rules, store: Store) -> int:
    return asyncio.run(_watch(rules, store))


async def _watch(rules: Rules, store: Store) -> int:
    source = ProcEvents()  # subscribed before the /proc pass: nothing starts unseen in between
    try:
        bus = await Bus.connect(broad=True)
    except BusError as err:
        source.close()
        raise FfrtmpError(f"cannot reach systemd: {err}") from None
    loop, stop = asyncio.get_running_loop(), loop_stop()
    host = Host(bus, asyncio.Lock(), agent=True)
    lost = asyncio.ensure_future(bus.disconnected())
    try:
        w = Watcher(rules, lambda c: adopt(host, store, c, w.exit_status, stop), source)
        source.listen(loop, w.on_events)
        w.scan()
        log.info("ffrtmp: watch: %d rules of %s, listening to process events", len(rules.rules), rules.path)
        first: list[asyncio.Future[Any]] = [stop, lost]
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        source.close()
        if not stop.done():  # as the agent: no more adoptions; what is adopted is observed to its end
            log.warning("ffrtmp: watch: %s; observing %d jobs to their end", bus.lost, len(host.jobs))
        detached = False
        while tasks := {*host.tasks, *w.tasks}:
            if stop.done() and not detached:  # as attach on a stop signal: detached, the workload runs on
                detached = True
                for j in host.jobs.values():
                    j.w.detach(stop.result())
            waiting: set[asyncio.Future[Any]] = {*tasks} if detached else {*tasks, stop}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        return 0 if stop.done() else 1
    finally:
        lost.cancel()
        source.close()
        bus.close()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def loop_stop() -> Stop:
    """The first stop signal (SIGINT, SIGTERM, SIGHUP); later ones change nothing."""
    loop = asyncio.get_running_loop()
    stop: Stop = loop.create_future()

    def stopped(sig: int) -> None:
        if not stop.done():
            stop.set_result(sig)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopped, sig)
    return stop
