"""The node agent over a long life: what it holds must not grow with the number of jobs it has governed.

An installed agent (ffrtmp.socket started in a sandbox of its own) is given rounds of jobs through the
real `ffrtmp run` and `ffrtmp attach`, live at once (their workloads wait at a barrier the test holds):
plain runs, attaches, a run whose command cannot be executed, an attach refused (its PID is already
governed), a client killed -9 while its job runs, and a client told to detach (SIGTERM). While they
are live the agent holds descriptors for them (each job's pidfd, each client's connection); once every
job has ended and been frozen, the agent's descriptors (/proc/PID/fd) are exactly those it had before
the first round, after each round. Its threads and private memory are printed (`pytest -s`), not
asserted: the threads are the loop's worker pool (bounded), and the memory keeps the allocator's
high-water mark of the most jobs live at once (bench/RESULTS.md has the figures per batch).
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
import signal
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from conftest import need_sandbox, result_of
from helpers import children, wait_for
from sandbox import Sandbox

pytestmark = [pytest.mark.mode("agent"), pytest.mark.timeout(300)]

RUNS, ATTACHES, ROUNDS = 16, 4, 2
PIPE = subprocess.PIPE


@pytest.fixture
def agent_sandbox() -> Iterator[Sandbox]:
    """A sandbox of its own in the installed mode: no other test's jobs pass through this agent."""
    need_sandbox()
    with Sandbox(agent=True) as sb:
        yield sb


def descriptors(pid: int) -> dict[int, str]:
    """What each of a process's descriptors refers to."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed while listed
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def usage(pid: int) -> str:
    status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    smaps = Path(f"/proc/{pid}/smaps_rollup").read_text()
    uss = sum(int(m) for m in re.findall(r"^Private_\w+:\s+(\d+) kB", smaps, re.M)) / 1024
    return f"{len(descriptors(pid))} fds, {status['Threads'].strip()} threads, USS {uss:.1f} MiB"


def said(proc: subprocess.Popen[bytes], log: Path) -> bool:
    return log.stat().st_size > 0 or proc.poll() is not None


def frozen(state: Path, jobs: list[str]) -> bool:
    return all((state / "results" / f"{j}.json").exists() for j in jobs)


def a_round(sb: Sandbox, agent: int, r: int, tmp: Path, env: dict[str, str]) -> list[str]:
    """One round of jobs, live at once, then all ended; the job ids that must have a record."""
    barrier, logs = tmp / f"barrier-{r}", tmp / f"logs-{r}"
    barrier.touch()
    logs.mkdir()
    wait = ["flock", "-s", str(barrier), "true"]
    clients: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def client(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = logs / name
        with log.open("wb") as out:
            p = sb.spawn(["ffrtmp", *args], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        clients[name] = (p, log)
        return p

    before = descriptors(agent)
    with barrier.open() as hold:
        fcntl.flock(hold, fcntl.LOCK_EX)
        workloads = [sb.spawn(wait, stdin=subprocess.DEVNULL) for _ in range(ATTACHES)]
        for i in range(RUNS):
            client(f"r{r}-run{i}", "run", "--job-id", f"r{r}-run{i}", "--", *wait)
        for i, w in enumerate(workloads):
            client(f"r{r}-att{i}", "attach", "--job-id", f"r{r}-att{i}", "--pid", str(sb.inner_pid(w, 60)[1]))
        client(f"r{r}-noexec", "run", "--job-id", f"r{r}-noexec", "--", "/nonexistent/command")
        killed = client(f"r{r}-killed", "run", "--job-id", f"r{r}-killed", "--", *wait)
        detached = client(f"r{r}-detached", "run", "--job-id", f"r{r}-detached", "--", *wait)
        for p, log in clients.values():
            wait_for(partial(said, p, log), timeout=120, what="every client's first line")
        taken = str(sb.inner_pid(workloads[0], 60)[1])
        refused = client(f"r{r}-refused", "attach", "--job-id", f"r{r}-refused", "--pid", taken)
        assert refused.wait(timeout=60) == 1, (logs / f"r{r}-refused").read_text()
        assert "already governed" in (logs / f"r{r}-refused").read_text()
        for name in (f"r{r}-killed", f"r{r}-detached"):
            assert "started in" in (logs / name).read_text(), (logs / name).read_text()
        live = descriptors(agent)
        print(f"\nlifetime: round {r + 1}, {RUNS + ATTACHES + 2} jobs live: the agent has {usage(agent)}")
        # Each live job holds at least its pidfd: a test that could not see descriptors come and go could
        # not see them stay either.
        assert len(live) >= len(before) + RUNS + ATTACHES
        os.kill(children(killed.pid)[0], signal.SIGKILL)  # the client, not nsenter: its job is the agent's
        os.kill(children(detached.pid)[0], signal.SIGTERM)  # the client detaches
        assert detached.wait(timeout=60) != 0
        fcntl.flock(hold, fcntl.LOCK_UN)
        codes = {name: p.wait(timeout=120) for name, (p, _) in clients.items()}
        for w in workloads:
            w.wait(timeout=60)
    assert codes[f"r{r}-noexec"] == 127, (logs / f"r{r}-noexec").read_text()
    ok = [f"r{r}-run{i}" for i in range(RUNS)] + [f"r{r}-att{i}" for i in range(ATTACHES)]
    assert {name: codes[name] for name in ok} == dict.fromkeys(ok, 0)
    return [*ok, f"r{r}-killed", f"r{r}-detached"]


def test_after_its_jobs_end_the_agent_holds_no_more_descriptors_than_before(
    agent_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb, state = agent_sandbox, tmp_path / "state"
    env = {"FFRTMP_STATE_DIR": str(state)}
    first = sb.run(["ffrtmp", "run", "--job-id", "first", "--", "true"], env=env)  # starts the agent
    assert first.returncode == 0 and ", agent)" in first.stderr, first.stderr
    inner = sb.systemctl("show", "-p", "MainPID", "--value", "ffrtmp-agent.service").stdout.strip()
    agent = sb.host_pid(int(inner))
    base = descriptors(agent)
    print(f"\nlifetime: before: the agent has {usage(agent)}")
    for r in range(ROUNDS):
        jobs = a_round(sb, agent, r, tmp_path, env)
        # Frozen: the killed client's job by the agent at its workload's end, the detached one at once.
        wait_for(partial(frozen, state, jobs), timeout=120, what="every record")
        assert "client lost" in (result_of(state, f"r{r}-killed")["governance_error"] or "")
        assert result_of(state, f"r{r}-detached")["platform_sla_reason"] == "detached_workload_continues"
        assert not (state / "results" / f"r{r}-noexec.json").exists()
        assert list((state / "jobs").iterdir()) == []
        # The clients are gone; the agent closes their connections as it reads their end: waited for
        # (as long as a slow machine may need), then what it still holds is the finding.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: len(descriptors(agent)) <= len(base), timeout=60)
        now = descriptors(agent)
        print(f"lifetime: round {r + 1} ended: the agent has {usage(agent)}")
        kept = {fd: what for fd, what in now.items() if base.get(fd) != what}
        assert kept == {}, f"after round {r + 1} the agent still holds {len(kept)} more descriptors: {kept}"
        assert len(now) == len(base)
