"""Observation against a real systemd: governance lost when the process leaves, OOM while attached."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import result_of, wait_for
from sandbox import Sandbox

STEAL = ["busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
         "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))"]  # fmt: skip


def test_process_moved_out_of_its_scope_is_governance_lost(sandbox: Sandbox, state_dir: Path) -> None:
    proc = sandbox.spawn(
        ["ffrtmp", "run", "--job-id", "moved", "--", "sleep", "300"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs = sandbox.cgroup_file("memory", "/ffrtmp.slice/ffrtmp-moved.scope", "cgroup.procs")
    wait_for(lambda: procs.exists() and procs.read_text().strip(), what="the scope")
    # the scope holds the wrapper's child from before its exec: wait until it is `sleep`
    (pid,) = wait_for(lambda: sandbox.run(["pgrep", "-x", "sleep"]).stdout.split(), what="the exec")
    r = sandbox.run([*STEAL, "thief.scope", "fail", "1", "PIDs", "au", "1", pid, "0"])
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not procs.exists(), what="the scope to empty")
    assert not (state_dir / "results" / "moved.json").exists()  # still observing the workload itself
    sandbox.systemctl("kill", "--signal=KILL", "thief.scope")
    assert proc.wait(timeout=20) == 137  # its own end, still observed after the scope was lost
    res = result_of(state_dir, "moved")
    assert res["platform_sla_reason"] == "governance_lost" and res["platform_sla_compliant"] is False


def test_oom_kill_of_an_attached_process_is_recorded(sandbox: Sandbox, state_dir: Path) -> None:
    hog = "import sys, time\nsys.stdin.readline()\nb = bytearray(0)\nwhile True: b += bytearray(16 << 20)"
    victim = sandbox.spawn(["python3", "-c", hog], stdin=subprocess.PIPE)
    _, pid = sandbox.inner_pid(victim)
    wrapper = sandbox.spawn(
        ["ffrtmp", "attach", "--pid", str(pid), "--job-id", "aoom", "--memory-max", "60M"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs = sandbox.cgroup_file("memory", "/ffrtmp.slice/ffrtmp-aoom.scope", "cgroup.procs")
    wait_for(lambda: procs.exists() and procs.read_text().strip(), what="adoption")
    assert victim.stdin is not None
    victim.stdin.write(b"go\n")
    victim.stdin.flush()
    assert wrapper.wait(timeout=30) == 0
    victim.wait(timeout=10)
    res = result_of(state_dir, "aoom")
    assert res["oom_killed"] is True and res["platform_sla_reason"] == "oom_killed"


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_the_wrapper_sleeps_while_systemd_settles_the_scope(sandbox: Sandbox, tmp_path: Path) -> None:
    """The workload exited but left a process in its scope, so the scope stays active: the wrapper
    waits (up to its settle time) for systemd to say inactive, and waiting must not cost CPU."""
    fifo, err = tmp_path / "go", tmp_path / "err"
    os.mkfifo(fifo)
    with err.open("wb") as out:
        proc = sandbox.spawn(
            ["ffrtmp", "run", "--job-id", "settle", "--", "sh", "-c", f"sleep 60 & read x < {fifo}"],
            env={"FFRTMP_STATE_DIR": str(tmp_path / "state")}, stdin=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    try:
        wrapper = sandbox.inner_pid(proc)[0]
        wait_for(lambda: "started in" in err.read_text(), what="the start line")
        children = Path(f"/proc/{wrapper}/task/{wrapper}/children")
        fifo.write_text("go\n")
        wait_for(lambda: children.read_text() == "", what="the workload to exit and be reaped")
        before = _cpu_ticks(wrapper)
        time.sleep(0.5)  # well within the 2 s settle time: the scope still holds `sleep 60`
        assert proc.poll() is None, "the wrapper ended before systemd settled the scope"
        spent = _cpu_ticks(wrapper) - before
        assert spent <= 5, f"the wrapper used {spent} clock ticks of CPU while it waited for systemd"
    finally:
        sandbox.systemctl("kill", "--signal=KILL", "ffrtmp-settle.scope")
        proc.wait(timeout=30)
