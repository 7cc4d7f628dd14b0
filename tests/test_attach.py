"""`ffrtmp attach` against a real systemd: adoption without disturbance, refusals that leave nothing."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Ffrtmp, read_until, result_of, scopes, wait_for
from sandbox import Sandbox

# A workload that records every catchable signal it receives, with one child that does the same.
WORKLOAD = """
import os, signal, sys, time
log = sys.argv[1]
def note(sig, _):
    with open(log, "a") as f: f.write(f"{os.getpid()} got {sig}\\n")
for s in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}:
    signal.signal(s, note)
if os.fork() == 0:
    time.sleep(float(sys.argv[2]) + 1); os._exit(0)
open(log + ".ready", "w").close()
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def workload(sandbox: Sandbox, state_dir: Path) -> Iterator[tuple[int, Path]]:
    """A live process with a child, outside any unit; yields (its PID in the sandbox, its signal log)."""
    log = state_dir / "signals.log"
    proc = sandbox.spawn(["python3", "-c", WORKLOAD, str(log), "4"])
    _, pid = sandbox.inner_pid(proc)
    wait_for(lambda: Path(f"{log}.ready").exists(), what="the workload")
    yield pid, log
    proc.kill()
    proc.wait()


def test_attach_adopts_process_and_children_without_any_signal(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path, workload: tuple[int, Path]
) -> None:
    pid, log = workload
    r = ffrtmp(
        "attach", "--pid", str(pid), "--job-id", "a", "--cpu-quota", "50", "--memory-max", "256M", "--json"
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # --json: only the result on stdout
    assert res == result_of(state_dir, "a")
    assert res["mode"] == "attach" and res["pid"] == pid and res["governed"] is True
    assert res["platform_sla_reason"] == "completed_within_limits" and res["exit_code"] is None
    assert res["origin_unit"] is None
    assert res["start_time"] < res["attach_time"] < res["end_time"]  # its own start, not the attach time
    assert not log.exists()  # neither process received any signal
    assert "JOB a | mode=attach" in r.stderr


def test_attached_processes_are_in_the_scope_with_limits(
    sandbox: Sandbox, state_dir: Path, workload: tuple[int, Path]
) -> None:
    pid, log = workload
    proc = sandbox.spawn(
        ["ffrtmp", "attach", "--pid", str(pid), "--job-id", "b", "--cpu-quota", "50", "--memory-max", "256M"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    cg = "/ffrtmp.slice/ffrtmp-b.scope"
    procs = sandbox.cgroup_file("memory", cg, "cgroup.procs")
    wait_for(lambda: procs.exists() and len(procs.read_text().split()) == 2, what="both processes adopted")
    assert sandbox.cgroup_file("memory", cg, "memory.limit_in_bytes").read_text().strip() == str(256 << 20)
    assert sandbox.cgroup_file("cpu", cg, "cpu.cfs_quota_us").read_text().strip() == "50000"
    status = sandbox.systemctl("status", "ffrtmp-b.scope").stdout
    assert f"ffrtmp attach job b: PID {pid}" in status
    assert proc.wait(timeout=30) == 0
    assert not log.exists()


def test_kill_9_of_the_attached_wrapper_leaves_the_workload_governed(
    sandbox: Sandbox, state_dir: Path, workload: tuple[int, Path]
) -> None:
    pid, log = workload
    proc = sandbox.spawn(
        ["ffrtmp", "attach", "--pid", str(pid), "--job-id", "k", "--memory-max", "128M"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    host_wrapper, _ = sandbox.inner_pid(proc)
    cg = "/ffrtmp.slice/ffrtmp-k.scope"
    procs = sandbox.cgroup_file("memory", cg, "cgroup.procs")
    wait_for(lambda: procs.exists() and procs.read_text().strip(), what="the scope")
    os.kill(host_wrapper, signal.SIGKILL)
    proc.wait(timeout=10)
    assert str(sandbox.host_pid(pid)) in procs.read_text().split()  # cgroup files list host PIDs
    assert sandbox.cgroup_file("memory", cg, "memory.limit_in_bytes").read_text().strip() == str(128 << 20)
    assert (state_dir / "jobs" / "k.json").exists() and not (state_dir / "results" / "k.json").exists()
    wait_for(lambda: not procs.exists(), timeout=30, what="the workload to end by itself")
    assert not log.exists()


def test_sigterm_to_the_attached_wrapper_detaches(
    sandbox: Sandbox, state_dir: Path, workload: tuple[int, Path]
) -> None:
    pid, log = workload
    proc = sandbox.spawn(
        ["ffrtmp", "attach", "--pid", str(pid), "--job-id", "d"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    host_wrapper, _ = sandbox.inner_pid(proc)
    procs = sandbox.cgroup_file("memory", "/ffrtmp.slice/ffrtmp-d.scope", "cgroup.procs")
    wait_for(lambda: procs.exists() and procs.read_text().strip(), what="the scope")
    os.kill(host_wrapper, signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    res = result_of(state_dir, "d")
    assert res["platform_sla_reason"] == "detached_workload_continues"
    assert str(sandbox.host_pid(pid)) in procs.read_text().split()  # still running, still governed
    assert not log.exists()


def test_service_owned_pid_is_refused_unless_forced(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path
) -> None:
    assert sandbox.run(["systemd-run", "-q", "--unit=victim", "sleep", "120"]).returncode == 0
    try:
        pid = sandbox.systemctl("show", "-p", "MainPID", "--value", "victim.service").stdout.strip()
        r = ffrtmp("attach", "--pid", pid, "--job-id", "v")
        assert r.returncode == 1
        assert (
            r.stderr.strip()
            == f"ffrtmp: PID {pid} belongs to victim.service: moving it out cannot be "
            + ("undone (use --force to adopt it)")
        )
        assert list(state_dir.rglob("*.json")) == [] and "ffrtmp-v" not in scopes(sandbox)
        assert sandbox.systemctl("show", "-p", "MainPID", "--value", "victim.service").stdout.strip() == pid
        proc = sandbox.spawn(
            ["ffrtmp", "attach", "--pid", pid, "--job-id", "v", "--force"],
            env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs = sandbox.cgroup_file("memory", "/ffrtmp.slice/ffrtmp-v.scope", "cgroup.procs")
        host = str(sandbox.host_pid(int(pid)))
        wait_for(lambda: procs.exists() and procs.read_text().split() == [host], what="forced adoption")
        r = ffrtmp("attach", "--pid", pid, "--job-id", "again")
        assert r.returncode == 1 and r.stderr.strip() == (
            f"ffrtmp: PID {pid} is already governed by job 'v' (ffrtmp-v.scope)"
        )
        assert not (state_dir / "jobs" / "again.json").exists()
        sandbox.systemctl("kill", "ffrtmp-v.scope")
        assert proc.wait(timeout=20) == 0
        assert result_of(state_dir, "v")["origin_unit"] == "victim.service"
    finally:
        sandbox.systemctl("stop", "victim.service")


@pytest.mark.parametrize(("pid", "message"), [
    ("1", "refusing PID 1: the init process cannot be adopted"),
    ("999999", "no process with PID 999999"),
])  # fmt: skip
def test_refusals_leave_nothing_behind(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path, pid: str, message: str
) -> None:
    r = ffrtmp("attach", "--pid", pid, "--job-id", "no")
    assert (r.returncode, r.stderr.strip()) == (1, f"ffrtmp: {message}")
    assert list(state_dir.rglob("*")) == [] and "ffrtmp-no" not in scopes(sandbox)


def test_attach_refuses_itself(sandbox: Sandbox, state_dir: Path) -> None:
    r = sandbox.run(
        ["sh", "-c", "exec ffrtmp attach --pid $$ --job-id self"], env={"FFRTMP_STATE_DIR": str(state_dir)}
    )
    assert r.returncode == 1 and "it is this wrapper or one of its ancestors" in r.stderr
    r = sandbox.run(
        ["sh", "-c", "ffrtmp attach --pid $$ --job-id parent"], env={"FFRTMP_STATE_DIR": str(state_dir)}
    )
    assert r.returncode == 1 and "it is this wrapper or one of its ancestors" in r.stderr
    assert list(state_dir.rglob("*")) == []


def test_an_adopted_parent_outlives_its_oom_killed_child(sandbox: Sandbox, state_dir: Path) -> None:
    parent = 'read x; python3 -c "b = bytearray(300 << 20)"; echo child=$?; read x; echo bye'
    proc = sandbox.spawn(["sh", "-c", parent], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _, pid = sandbox.inner_pid(proc)
    wrapper = sandbox.spawn(
        ["ffrtmp", "attach", "--pid", str(pid), "--job-id", "aoomc", "--memory-max", "40M"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert wrapper.stderr is not None and proc.stdin is not None and proc.stdout is not None
    read_until(wrapper, "adopted into")
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"child=137\n"
    shown = sandbox.systemctl("show", "-p", "ActiveState,OOMPolicy", "ffrtmp-aoomc.scope").stdout.split()
    assert sorted(shown) == ["ActiveState=active", "OOMPolicy=continue"]
    proc.stdin.write(b"bye\n")  # the parent still answers
    proc.stdin.flush()
    assert proc.stdout.readline() == b"bye\n" and proc.wait(timeout=10) == 0
    assert wrapper.wait(timeout=30) == 0
    res = result_of(state_dir, "aoomc")
    assert res["oom_killed"] is True and res["platform_sla_reason"] == "oom_killed"
