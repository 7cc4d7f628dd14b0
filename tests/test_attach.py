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
from conftest import Ffrtmp, read_until, result_of, scopes, try_release, wait_for
from helpers import ffrtmp_scopes, start_governed
from sandbox import Sandbox

# A workload that records every catchable signal it receives, with one child that does the same;
# the child ends after a line on the FIFO beside the log (`finish`), the parent when its child has.
WORKLOAD = """
import os, signal, sys
log, go = sys.argv[1], sys.argv[2]
def note(sig, _):
    with open(log, "a") as f: f.write(f"{os.getpid()} got {sig}\\n")
for s in set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}:
    signal.signal(s, note)
kid = os.fork()
if kid == 0:
    with open(go) as f: f.readline()
    os._exit(0)
open(log + ".ready", "w").close()
os.waitpid(kid, 0)
"""


def finish(log: Path) -> None:
    """Let the workload whose signal log is `log` end (both processes), as it would by itself."""
    wait_for(lambda: try_release(log.with_name("go")), what="the workload to read its FIFO")


@pytest.fixture
def workload(sandbox: Sandbox, state_dir: Path) -> Iterator[tuple[int, Path]]:
    """A live process with a child, outside any unit; yields (its PID in the sandbox, its signal log).
    It runs until `finish(log)`."""
    log = state_dir / "signals.log"
    os.mkfifo(log.with_name("go"))
    proc = sandbox.spawn(["python3", "-c", WORKLOAD, str(log), str(log.with_name("go"))])
    _, pid = sandbox.inner_pid(proc)
    wait_for(lambda: Path(f"{log}.ready").exists(), what="the workload")
    yield pid, log
    try_release(log.with_name("go"))  # a test that left it running
    proc.kill()
    proc.wait()


def test_attach_adopts_process_and_children_without_any_signal(
    sandbox: Sandbox, state_dir: Path, workload: tuple[int, Path]
) -> None:
    pid, log = workload
    proc = sandbox.spawn(
        ["ffrtmp", "attach", "--pid", str(pid), "--job-id", "a", "--cpu-quota", "50", "--memory-max", "256M",
         "--json"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    said = "\n".join(read_until(proc, "adopted into"))
    finish(log)
    out, err = proc.communicate(timeout=30)
    said += err.decode()
    assert proc.returncode == 0, said
    res = json.loads(out)  # --json: only the result on stdout
    assert res == result_of(state_dir, "a")
    assert res["mode"] == "attach" and res["pid"] == pid and res["governed"] is True
    assert res["platform_sla_reason"] == "completed_within_limits" and res["exit_code"] is None
    assert res["origin_unit"] is None
    assert res["start_time"] < res["attach_time"] < res["end_time"]  # its own start, not the attach time
    assert not log.exists()  # neither process received any signal
    assert "JOB a | mode=attach" in said


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
    finish(log)
    assert proc.wait(timeout=30) == 0
    assert not log.exists()


def test_kill_9_of_the_attached_wrapper_leaves_the_workload_governed(
    sandbox: Sandbox, state_dir: Path, workload: tuple[int, Path]
) -> None:
    pid, log = workload
    args = ["attach", "--pid", str(pid), "--job-id", "k", "--memory-max", "128M"]
    proc, host_wrapper, procs = start_governed(sandbox, state_dir, args, "k")
    cg = "/ffrtmp.slice/ffrtmp-k.scope"
    os.kill(host_wrapper, signal.SIGKILL)
    proc.wait(timeout=10)
    assert str(sandbox.host_pid(pid)) in procs.read_text().split()  # cgroup files list host PIDs
    assert sandbox.cgroup_file("memory", cg, "memory.limit_in_bytes").read_text().strip() == str(128 << 20)
    assert (state_dir / "jobs" / "k.json").exists() and not (state_dir / "results" / "k.json").exists()
    finish(log)
    wait_for(lambda: not procs.exists(), timeout=30, what="the workload to end by itself")
    assert not log.exists()


def test_sigterm_to_the_attached_wrapper_detaches(
    sandbox: Sandbox, state_dir: Path, workload: tuple[int, Path]
) -> None:
    pid, log = workload
    proc, host_wrapper, procs = start_governed(
        sandbox, state_dir, ["attach", "--pid", str(pid), "--job-id", "d"], "d"
    )
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


def test_attach_never_moves_another_jobs_workload(sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path) -> None:
    """The shell that started a `ffrtmp run` job: its descendant (the workload) is in that job's scope."""
    fifo = state_dir / "fifo"
    os.mkfifo(fifo)
    shell = sandbox.spawn(["sh", "-c", f"ffrtmp run --job-id a -- sh -c 'read x < {fifo}'; sleep 300"],
                          env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL)  # fmt: skip
    _, pid = sandbox.inner_pid(shell)
    procs = sandbox.cgroup_file("memory", "/ffrtmp.slice/ffrtmp-a.scope", "cgroup.procs")
    wait_for(lambda: procs.exists() and procs.read_text().strip(), what="job a's workload")
    try:
        r = ffrtmp("attach", "--pid", str(pid), "--job-id", "b", timeout=20)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert f"(a descendant of PID {pid}) is already governed by job 'a' (ffrtmp-a.scope)" in r.stderr
        assert "ffrtmp-b" not in scopes(sandbox) and not (state_dir / "jobs" / "b.json").exists()
        assert procs.read_text().strip()  # job a's workload stays where it is
    finally:
        wait_for(lambda: try_release(fifo), what="the workload to read its FIFO")
        shell.kill()
        shell.wait()
    wait_for(lambda: (state_dir / "results" / "a.json").exists(), what="job a's record")
    assert result_of(state_dir, "a")["platform_sla_reason"] == "completed_within_limits"


def test_of_two_attaches_of_one_pid_exactly_one_wins(sandbox: Sandbox, state_dir: Path) -> None:
    env = {"FFRTMP_STATE_DIR": str(state_dir)}
    for round_ in range(3):
        target = sandbox.spawn(["sleep", "300"])
        host, pid = sandbox.inner_pid(target)
        jobs = [f"r{round_}x", f"r{round_}y"]
        both = [sandbox.spawn(["ffrtmp", "attach", "--pid", str(pid), "--job-id", j], env=env,
                              stderr=subprocess.PIPE) for j in jobs]  # fmt: skip
        try:
            wait_for(lambda b=both: any(p.poll() is not None for p in b), timeout=30, what="one refusal")
            loser = next(i for i, p in enumerate(both) if p.poll() is not None)
            assert both[loser].returncode == 1
            assert both[loser].stderr is not None
            assert f"PID {pid} is already governed by job" in both[loser].stderr.read().decode()
            assert not (state_dir / "jobs" / f"{jobs[loser]}.json").exists()
        finally:
            target.kill()
            target.wait()
            os.kill(host, signal.SIGKILL)
        assert both[1 - loser].wait(timeout=30) == 0
        assert result_of(state_dir, jobs[1 - loser])["platform_sla_reason"] == "completed_within_limits"


def test_children_of_any_thread_are_adopted(sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path) -> None:
    code = (
        "import subprocess, threading, time\n"
        "def spawn():\n"
        "    print(subprocess.Popen(['sleep', '300']).pid, flush=True)\n"
        "    time.sleep(300)  # a thread that ends leaves its children to the main thread\n"
        "threading.Thread(target=spawn).start()\n"
    )
    proc = sandbox.spawn(["python3", "-c", code], stdout=subprocess.PIPE)
    host, pid = sandbox.inner_pid(proc)
    assert proc.stdout is not None
    kid = sandbox.host_pid(int(proc.stdout.readline()))
    attach = sandbox.spawn(["ffrtmp", "attach", "--pid", str(pid), "--job-id", "t"],
                           env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.PIPE)  # fmt: skip
    try:
        read_until(attach, "adopted into")
        procs = sandbox.cgroup_file("memory", "/ffrtmp.slice/ffrtmp-t.scope", "cgroup.procs").read_text()
        assert sorted(procs.split()) == sorted([str(host), str(kid)])
    finally:
        sandbox.systemctl("kill", "ffrtmp-t.scope")
        attach.wait(timeout=30)
        proc.wait()


def test_attach_json_is_the_only_thing_on_stdout_even_with_stderr_closed(
    sandbox: Sandbox, state_dir: Path, workload: tuple[int, Path]
) -> None:
    pid, log = workload
    proc = sandbox.spawn(["sh", "-c", f"ffrtmp attach --pid {pid} --job-id j --json 2>&-"],
                         env={"FFRTMP_STATE_DIR": str(state_dir)}, stdout=subprocess.PIPE)  # fmt: skip
    wait_for(lambda: "ffrtmp-j.scope" in ffrtmp_scopes(sandbox, "active"), what="the scope")
    finish(log)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and json.loads(out) == result_of(state_dir, "j")


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
