"""Scale: 1,000 governed jobs at once on one node, through the agent (issue 11).

Each job is `ffrtmp run --job-id scale-I --memory-max M_I --cpu-weight 50 -- flock -s BARRIER true
scale-I`, started in a sandbox in the installed mode (ffrtmp.socket started) while the test holds
BARRIER: all of them wait at once. Then every one must be governed (its scope active, its workload
alone in its cgroup, its own memory limit in its cgroup file), and throughout, from the first start
to the last exit, root's `busctl --system list` and `systemctl list-units` must keep answering (the
issue: with a bus connection per job, 255 were governed, 45 ran ungoverned and busctl failed with "No
buffer space available"). Released, every client exits 0 and every job is frozen exactly once.

The in-process mode cannot do this: there each job holds its own system-bus connection for its
whole life and dbus-daemon allows 256 connections per user. So this is a test of the agent mode
(`pytest --mode agent`); the in-process mode leaves it out.

How long busctl and systemctl took (by phase: while the clients start, all live, while they end),
and how close the agent, systemd and dbus-daemon came to their limits (descriptors, tasks,
connections, memory), is printed (`pytest -s`) as `scale: ...` lines. Every call must be answered; how
fast is printed, not asserted: while 1,000 clients start on 2 cores a busctl process itself waits
seconds for a CPU (seen: 10 s at most while starting, 0.06 s with all live).
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from conftest import need_sandbox, result_of
from helpers import MiB, children, wait_for
from sandbox import Sandbox

pytestmark = [pytest.mark.slow, pytest.mark.mode("agent"), pytest.mark.timeout(2400)]

N = int(os.environ.get("FFRTMP_SCALE_JOBS", "1000"))  # fewer only to try the test itself


def memory(i: int) -> int:
    return (64 + i % 512) * MiB


class Probe:
    """`busctl --system list` and `systemctl list-units` inside the sandbox, one after the other, again
    and again, in a thread, until stopped: how long each took, and every failure."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.phase = "start"  # start (clients starting), live (all governed, waiting), end (all ending)
        self.times: dict[tuple[str, str], list[float]] = {}
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        cmds = {"busctl": ["busctl", "--system", "list"], "systemctl": ["systemctl", "list-units"]}
        while not self.stop.is_set():
            for name, cmd in cmds.items():
                t = time.monotonic()
                try:
                    r = self.sb.run(cmd, timeout=120)
                    ok, why = r.returncode == 0, r.stderr.strip()
                except subprocess.TimeoutExpired:
                    ok, why = False, "no answer in 120 s"
                self.times.setdefault((self.phase, name), []).append(time.monotonic() - t)
                if not ok:
                    self.failures.append(f"{name}: {why}")
            self.stop.wait(0.2)

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=300)

    def rounds(self, phase: str) -> int:
        return len(self.times.get((phase, "systemctl"), []))

    def summary(self) -> str:
        out = []
        for (phase, name), xs in self.times.items():
            s = sorted(xs)
            over = sum(x > 1 for x in s)
            out.append(f"{phase}: {name} answered {len(s)} times, median {s[len(s) // 2]:.2f} s, "
                       f"max {s[-1]:.2f} s, {over} over 1 s")  # fmt: skip
        return "; ".join(out) + f"; {len(self.failures)} failed"


def spoke(logs: list[Path]) -> bool:
    """Every one of these clients said its first line."""
    return all(log.stat().st_size for log in logs)


def pids_of(sb: Sandbox, unit: str) -> list[int]:
    procs = sb.cgroup_file("memory", f"/ffrtmp.slice/{unit}", "cgroup.procs")
    try:
        return [int(p) for p in procs.read_text().split()]
    except OSError:
        return []


def governed(sb: Sandbox, barrier: Path, i: int) -> str | None:
    """Why job i is not governed as asked (None: it is): its workload alone in its scope, its limit set."""
    unit = f"ffrtmp-scale-{i}.scope"
    pids = pids_of(sb, unit)
    if len(pids) != 1:
        return f"{unit}: processes {pids}"
    argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")[:-1]
    if argv != [b"flock", b"-s", str(barrier).encode(), b"true", f"scale-{i}".encode()]:
        return f"{unit}: holds {argv}"
    limit = sb.cgroup_file("memory", f"/ffrtmp.slice/{unit}", "memory.limit_in_bytes").read_text().strip()
    if limit != str(memory(i)):
        return f"{unit}: memory.limit_in_bytes {limit}, not {memory(i)}"
    if str(pids[0]) not in sb.cgroup_file("cpu", f"/ffrtmp.slice/{unit}", "cgroup.procs").read_text().split():
        return f"{unit}: its process is not in its cpu cgroup"
    return None


def headroom(sb: Sandbox) -> str:
    """Descriptors, tasks and memory of the agent, systemd and dbus-daemon, against their limits."""
    out = []
    for name, unit in (("agent", "ffrtmp-agent.service"), ("dbus-daemon", "dbus.service")):
        inner = sb.systemctl("show", "-p", "MainPID", "--value", unit).stdout.strip()
        out.append(usage(name, sb.host_pid(int(inner)) if inner.isdigit() and inner != "0" else 0))
    out.append(usage("systemd", sb.pid))
    conns = sb.run(["busctl", "--system", "list", "--unique", "--no-legend"]).stdout.count("\n")
    tasks = sb.run(["sh", "-c", "ls /proc | grep -c '^[0-9]'"]).stdout.strip()
    return "; ".join(out) + f"; {conns} bus connections; {tasks} processes in the sandbox"


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in KiB."""
    return int(
        next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if "MemAvailable" in ln).split()[1]
    )


def memory_of(procs: list[subprocess.Popen[bytes]], before: int) -> str:
    """The clients' private memory (USS, smaps_rollup) in all and each, and how much MemAvailable fell."""
    kib = []
    for p in procs:  # each is nsenter, whose child is the client
        for kid in children(p.pid)[:1]:
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{kid}/smaps_rollup").read_text()
                kib.append(sum(int(m) for m in re.findall(r"^Private_\w+:\s+(\d+) kB", text, re.M)))
    fell, each = (before - mem_available()) / 1024**2, sum(kib) / max(1, len(kib)) / 1024
    return (f"the {len(kib)} clients' USS {sum(kib) / 1024**2:.2f} GiB in all ({each:.1f} MiB each); "
            f"MemAvailable fell by {fell:.2f} GiB")  # fmt: skip


def usage(name: str, pid: int) -> str:
    if not pid:
        return f"{name}: not running"
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        nofile = next(ln for ln in limits if ln.startswith("Max open files")).split()[3:5]
        status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
        return (f"{name}: {fds} fds (limit {'/'.join(nofile)}), {status['Threads'].strip()} threads, "
                f"RSS {status['VmRSS'].strip()}")  # fmt: skip
    except OSError as err:
        return f"{name}: {err}"


@pytest.fixture
def agent_sandbox() -> Iterator[Sandbox]:
    """A sandbox of its own in the installed mode, whatever the suite's --mode (the test marks it)."""
    need_sandbox()
    with Sandbox() as sb:
        # The product gives systemd 5 s to answer a scope's start. Here the test itself starts 1,000 Python
        # clients at once on 2 cores that the suite's other files share (pytest-xdist): systemd waits for a
        # CPU behind them, and a CI run saw 7 of 1,000 starts answered later than 5 s (each scope made, the
        # job recorded "outcome unknown"). A longer limit keeps the test about the agent at scale, not the
        # machine's speed (as tests/test_load.py does); the agent inherits the manager's environment.
        sb.systemctl("set-environment", "FFRTMP_BUS_TIMEOUT=60")
        sb.start_agent()
        sb.agent = True
        yield sb


def test_1000_jobs_at_once_through_the_agent(agent_sandbox: Sandbox, tmp_path: Path) -> None:
    sb, state, logs, barrier = agent_sandbox, tmp_path / "state", tmp_path / "logs", tmp_path / "barrier"
    logs.mkdir()
    barrier.touch()
    env = {"FFRTMP_STATE_DIR": str(state)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with Probe(sb) as probe, barrier.open() as hold:
            fcntl.flock(hold, fcntl.LOCK_EX)
            t, available = time.monotonic(), mem_available()
            said = [logs / str(i) for i in range(N)]
            for i in range(N):
                limits = ["--memory-max", str(memory(i)), "--cpu-weight", "50"]
                work = ["flock", "-s", str(barrier), "true", f"scale-{i}"]
                cmd = ["ffrtmp", "run", "--job-id", f"scale-{i}", *limits, "--", *work]
                with said[i].open("wb") as err:
                    procs.append(sb.spawn(cmd, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err))
            wait_for(partial(spoke, said), timeout=1200, what="every start line", every=1)
            ramp = time.monotonic() - t
            first = [p.read_text().split("\n", 1)[0] for p in said]
            bad = [(i, ln) for i, ln in enumerate(first) if f"started in ffrtmp-scale-{i}.scope" not in ln]
            for i, ln in bad[:5]:  # what became of them, for the report
                unit = f"ffrtmp-scale-{i}.scope"
                active = sb.systemctl("show", "-p", "ActiveState", "--value", unit).stdout.strip()
                print(f"scale: not governed: {ln!r}; systemd: {unit} {active}, holding {pids_of(sb, unit)}")
            assert bad == [], f"{len(bad)} of {N} not governed, e.g. {bad[:3]}"
            assert all(ln.endswith(", agent)") for ln in first), first[0]
            print(f"\nscale: {N} jobs governed {ramp:.1f} s after the first was spawned")
            print(f"scale: all {N} live: {headroom(sb)}; {memory_of(procs, available)}")
            units = sb.systemctl(
                "list-units", "--plain", "--no-legend", "--state=active", "ffrtmp-scale-*.scope"
            )
            assert len(units.stdout.splitlines()) == N
            assert [why for i in range(N) if (why := governed(sb, barrier, i))] == []
            assert all(p.poll() is None for p in procs)
            probe.phase = "live"
            wait_for(lambda: probe.rounds("live") >= 3, timeout=600, what="busctl and systemctl, all live")
            probe.phase = "end"
            fcntl.flock(hold, fcntl.LOCK_UN)  # every workload exits 0; every job is frozen
            codes = [p.wait(timeout=1200) for p in procs]
            print(f"scale: all {N} ended {time.monotonic() - t:.1f} s after the first was spawned")
        print(f"scale: while they ran: {probe.summary()}")
        assert probe.failures == []  # every call answered (the issue: "No buffer space available")
        assert codes == [0] * N
        for i in range(N):
            lines = said[i].read_text().splitlines()
            assert len(lines) == 2 and lines[1].startswith(
                f"JOB scale-{i} | mode=run | intent=- | sla=COMPLIANT"
            )
        assert sorted(p.name for p in (state / "results").iterdir()) == sorted(
            f"scale-{i}.json" for i in range(N)
        )
        assert list((state / "jobs").iterdir()) == []
        for i in range(N):
            res = result_of(state, f"scale-{i}")
            assert (res["governed"], res["exit_code"], res["limits"]["memory_max"]) == (True, 0, memory(i))
            assert res["platform_sla_reason"] == "completed_within_limits"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
