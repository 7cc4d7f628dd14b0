"""Crash matrix: `kill -9` of the wrapper at each stage, in run and attach mode, then reconciliation.

Each stage is reached with real components; only the silent bus is a fake (no real component
accepts a connection and never answers):

- bus_silent: DBUS_SYSTEM_BUS_ADDRESS names a socket that accepts and never answers; the wrapper
  is stuck in the D-Bus handshake.
- systemd_frozen: the sandbox's systemd is stopped (SIGSTOP); the wrapper is connected to the bus
  and waits for systemd's first answer (Subscribe).
- start_job_pending: ffrtmp.slice is made to wait for a oneshot service that waits on a FIFO, so
  the scope's start job stays queued; the wrapper waits for its JobRemoved. After the kill the
  hold is let go: systemd makes the scope with the PID anyway.
- start_job_fails: the same hold, let go with a failure: the start job ends `dependency`, the scope
  never exists.
- observing: after the wrapper's start line.

In every case the workload runs to completion (a marker written at its end), is governed (cgroup
files) as soon as a scope holds it, and after it ends one `ffrtmp reconcile` leaves exactly one
`observer_lost` result per job that has a contract, no contract and no scope; a second changes nothing.
An attach killed before it wrote its contract has no job: nothing was touched, nothing is recorded.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import hold_start_jobs, result_of, scopes, start_job_queued, try_release, wait_for
from sandbox import Sandbox

MiB = 1024 * 1024
LIMITS = ["--memory-max", "64M", "--cpu-quota", "50"]
SWEPT = re.compile(r"ffrtmp: removed \S+/jobs/\.\S+\.json\.\d+\.tmp, left by PID \d+ killed while writing it")


@dataclass(frozen=True)
class Case:
    mode: str  # run | attach
    stage: str
    governed: bool  # a scope ends up holding the workload
    contract: bool  # the kill leaves a contract, so reconciliation freezes one result

    @property
    def job(self) -> str:
        return f"{self.mode}-{self.stage}"


CASES = [
    Case("run", "bus_silent", governed=False, contract=True),
    Case("attach", "bus_silent", governed=False, contract=False),
    Case("run", "systemd_frozen", governed=False, contract=True),
    Case("attach", "systemd_frozen", governed=False, contract=False),
    Case("run", "start_job_pending", governed=True, contract=True),
    Case("attach", "start_job_pending", governed=True, contract=True),
    Case("run", "start_job_fails", governed=False, contract=True),
    Case("attach", "start_job_fails", governed=False, contract=True),
    Case("run", "observing", governed=True, contract=True),
    Case("attach", "observing", governed=True, contract=True),
]


def on_bus(sandbox: Sandbox, pid: int) -> bool:
    """The process with this sandbox PID has a connection on the sandbox's bus (dbus-daemon answers)."""
    lines = sandbox.run(["busctl", "list", "--no-legend", "--unique"], timeout=10).stdout.splitlines()
    return any(line.split()[1:2] == [str(pid)] for line in lines)


def inner_pid(host_pid: int) -> int:
    """The sandbox PID of a process known by its host PID."""
    status = Path(f"/proc/{host_pid}/status").read_text().splitlines()
    return int(next(ln for ln in status if ln.startswith("NSpid:")).split()[-1])


def memory_cgroup(host_pid: int) -> str:
    line = next(ln for ln in Path(f"/proc/{host_pid}/cgroup").read_text().splitlines() if ":memory:" in ln)
    return line.split(":", 2)[2]


def assert_governed(sandbox: Sandbox, job: str, host_pid: int) -> None:
    """In its scope, with its limits in the cgroup files."""
    cg = f"/ffrtmp.slice/ffrtmp-{job}.scope"
    assert memory_cgroup(host_pid).endswith(cg)
    assert str(host_pid) in sandbox.cgroup_file("memory", cg, "cgroup.procs").read_text().split()
    assert sandbox.cgroup_file("memory", cg, "memory.limit_in_bytes").read_text().strip() == str(64 * MiB)
    assert str(host_pid) in sandbox.cgroup_file("cpu", cg, "cgroup.procs").read_text().split()
    assert sandbox.cgroup_file("cpu", cg, "cpu.cfs_quota_us").read_text().strip() == "50000"


def state_files(state_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(state_dir)): p.read_bytes() for p in state_dir.rglob("*") if p.is_file()}


@contextlib.contextmanager
def silent_bus(path: Path) -> Iterator[socket.socket]:
    """A unix socket that accepts connections and never answers."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(30)
    try:
        yield srv
    finally:
        srv.close()


def stuck_in_handshake(srv: socket.socket) -> socket.socket:
    """Accept the wrapper's connection and read until it has asked to authenticate; never answer."""
    conn, _ = srv.accept()
    conn.settimeout(30)
    got = b""
    while b"AUTH" not in got:
        chunk = conn.recv(256)
        assert chunk, f"the wrapper hung up during the handshake: {got!r}"
        got += chunk
    return conn


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.job)
def test_kill_9(fresh_sandbox: Sandbox, tmp_path: Path, case: Case) -> None:
    sandbox, job, unit = fresh_sandbox, case.job, f"ffrtmp-{case.job}.scope"
    state_dir, fifo, hold, marker = (tmp_path / n for n in ("state", "go", "hold", "marker"))
    os.mkfifo(fifo)
    err_file = tmp_path / "wrapper.err"
    env = {"FFRTMP_STATE_DIR": str(state_dir)}
    if case.stage.startswith("start_job"):
        os.mkfifo(hold)
        hold_start_jobs(sandbox, hold)
    script = f"read x < {fifo}; echo done > {marker}"
    attached: subprocess.Popen[bytes] | None = None
    with contextlib.ExitStack() as stack:
        if case.stage == "bus_silent":
            srv = stack.enter_context(silent_bus(tmp_path / "bus"))
            env["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={tmp_path / 'bus'}"
        if case.mode == "attach":
            attached = sandbox.spawn(["sh", "-c", script], stdin=subprocess.DEVNULL)
            stack.callback(attached.wait, 30)
            stack.callback(try_release, fifo)
            host, pid = sandbox.inner_pid(attached)
            cmd = ["attach", "--pid", str(pid), "--job-id", job, *LIMITS]
        else:
            cmd = ["run", "--job-id", job, *LIMITS, "--", "sh", "-c", script]
        origin = memory_cgroup(host) if case.mode == "attach" else ""
        if case.stage == "systemd_frozen":
            stack.callback(os.kill, sandbox.pid, signal.SIGCONT)  # never leave systemd stopped
            os.kill(sandbox.pid, signal.SIGSTOP)
        err = stack.enter_context(err_file.open("wb"))
        wrapper = sandbox.spawn(["ffrtmp", *cmd], env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        stack.callback(wrapper.wait, 30)
        stack.callback(wrapper.kill)
        wrapper_host, wrapper_pid = sandbox.inner_pid(wrapper)

        # Reach the stage, then kill -9 the wrapper.
        if case.stage == "bus_silent":
            stack.enter_context(stuck_in_handshake(srv))
        elif case.stage == "systemd_frozen":
            wait_for(lambda: on_bus(sandbox, wrapper_pid), what="the wrapper on the bus")
        elif case.stage.startswith("start_job"):
            wait_for(lambda: start_job_queued(sandbox, unit), what="the scope's start job")
        else:
            line = "started in" if case.mode == "run" else "adopted into"
            wait_for(lambda: line in err_file.read_text(), what="the start line")
        if case.mode == "run":
            children = Path(f"/proc/{wrapper_host}/task/{wrapper_host}/children")
            wait_for(lambda: children.read_text().split(), what="the forked child")
            host = int(children.read_text().split()[0])
            pid = inner_pid(host)
        pidfd = os.pidfd_open(host)
        stack.callback(os.close, pidfd)
        if case.stage == "observing":
            assert_governed(sandbox, job, host)
        os.kill(wrapper_host, signal.SIGKILL)
        assert wrapper.wait(timeout=30) != 0
        said = err_file.read_text()
        if case.stage != "observing":  # killed before it got anywhere: it said nothing
            assert said == "", said

        # After the kill: let systemd go on, as it would.
        if case.stage == "systemd_frozen":
            os.kill(sandbox.pid, signal.SIGCONT)
        elif case.stage.startswith("start_job"):
            wait_for(
                lambda: try_release(hold, "0" if case.stage == "start_job_pending" else "1"), what="hold"
            )
            wait_for(lambda: not start_job_queued(sandbox, unit), what="the start job to end")
        assert sandbox.state() in ("running", "degraded")
        assert not select.select([pidfd], [], [], 0)[0], "the workload died with its wrapper"
        if case.governed:
            assert_governed(sandbox, job, host)  # stays governed while it runs, wrapper or not
        elif case.mode == "attach":
            assert memory_cgroup(host) == origin  # never touched
        else:
            assert "/ffrtmp.slice/" not in memory_cgroup(host)  # ran ungoverned
        assert unit not in scopes(sandbox) or case.governed

        # While it runs, reconciliation leaves the job alone.
        early = sandbox.run(["ffrtmp", "reconcile"], env={"FFRTMP_STATE_DIR": str(state_dir)})
        assert (early.returncode, early.stdout) == (0, "")
        left = f"ffrtmp: job {job} left alone: "
        # a kill that landed while the wrapper rewrote its contract left a temp file: swept, one line
        said = [ln for ln in early.stderr.splitlines() if not SWEPT.fullmatch(ln)]
        assert len(said) == 1 and said[0].startswith(left) if case.contract else said == [], early.stderr
        assert (state_dir / "jobs" / f"{job}.json").exists() == case.contract
        assert not (state_dir / "results").exists()

        # The workload runs to completion.
        assert not marker.exists()
        wait_for(lambda: try_release(fifo), what="the workload to read its FIFO")
        assert select.select([pidfd], [], [], 30)[0], "the workload did not end"
        assert marker.read_text() == "done\n"
        if attached is not None:
            assert attached.wait(timeout=30) == 0
    wait_for(lambda: unit not in scopes(sandbox), what="the scope to go")

    # Reconciliation: exactly one result for a job with a contract, then nothing changes.
    first = sandbox.run(["ffrtmp", "reconcile"], env={"FFRTMP_STATE_DIR": str(state_dir)})
    assert first.returncode == 0, first.stderr
    results = sorted(p.name for p in (state_dir / "results").glob("*"))
    assert results == ([f"{job}.json"] if case.contract else [])
    assert list((state_dir / "jobs").glob("*")) == []
    if case.contract:
        assert first.stdout.startswith(f"JOB {job} | mode={case.mode} | intent=- | sla=VIOLATION")
        assert "| reason=observer_lost |" in first.stdout and "| exit=- |" in first.stdout
        assert len(first.stdout.splitlines()) == 1
        res = result_of(state_dir, job)
        assert (res["platform_sla_reason"], res["platform_sla_compliant"]) == ("observer_lost", False)
        assert (res["mode"], res["pid"], res["unit"]) == (case.mode, pid, unit)
        assert (res["exit_code"], res["signal"], res["oom_killed"]) == (None, None, False)
        assert res["governed"] is case.governed  # seen by the wrapper, or by the reconcile while it ran
        assert res["start_time"] <= res["end_time"]
    else:  # an attach killed before its contract: no job, no record
        assert (first.stdout, first.stderr) == ("", "")
    before = state_files(state_dir)
    second = sandbox.run(["ffrtmp", "reconcile"], env={"FFRTMP_STATE_DIR": str(state_dir)})
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert state_files(state_dir) == before
    assert unit not in scopes(sandbox)
