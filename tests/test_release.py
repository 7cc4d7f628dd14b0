"""`ffrtmp release`: every limit of a running job's scope lifted, the record says when."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from conftest import Ffrtmp, result_of, wait_for
from sandbox import Sandbox

UNLIMITED = "9223372036854771712"  # memory.limit_in_bytes without a limit (v1)


def effective(pid: int, controller: str, name: str) -> str:
    """A cgroup file of the cgroup that host PID `pid` is in now (systemd may drop unneeded controllers)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if ctrl == controller:
            return (Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name).read_text().strip()
    raise LookupError(controller)


def test_release_lifts_limits_and_is_recorded(sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path) -> None:
    dev = sorted(Path("/sys/dev/block").iterdir())[-1].name
    proc = sandbox.spawn(
        ["ffrtmp", "run", "--job-id", "rel", "--cpu-quota", "30", "--cpu-weight", "50", "--memory-max",
         "200M", "--io-max", f"{dev} rbps=1M", "--", "sleep", "300"],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    cg = "/ffrtmp.slice/ffrtmp-rel.scope"
    quota = sandbox.cgroup_file("cpu", cg, "cpu.cfs_quota_us")
    wait_for(lambda: quota.exists() and quota.read_text().strip() == "30000", what="the limits")
    procs = sandbox.cgroup_file("memory", cg, "cgroup.procs")  # systemd writes limits, then moves PIDs
    wait_for(lambda: procs.read_text().split(), what="the workload in the scope")
    pid = int(procs.read_text().split()[0])
    assert effective(pid, "memory", "memory.limit_in_bytes") == str(200 << 20)
    r = ffrtmp("release", "rel")
    assert r.returncode == 0 and r.stderr.strip() == "ffrtmp: limits of ffrtmp-rel.scope lifted"
    assert effective(pid, "cpu", "cpu.cfs_quota_us") == "-1"
    assert effective(pid, "cpu", "cpu.shares") == "1024"
    assert effective(pid, "memory", "memory.limit_in_bytes") == UNLIMITED
    assert effective(pid, "blkio", "blkio.throttle.read_bps_device") == ""
    assert sandbox.systemctl("is-active", "ffrtmp-rel.scope").stdout.strip() == "active"
    assert "max:" not in sandbox.systemctl("status", "ffrtmp-rel.scope").stdout
    released = (state_dir / "jobs" / "rel.json").read_text()
    assert '"limits_released_at": "20' in released
    sandbox.systemctl("kill", "ffrtmp-rel.scope")
    proc.wait(timeout=20)
    res = result_of(state_dir, "rel")
    assert res["limits_released_at"] and res["limits_released_at"] in released
    assert res["limits"]["memory_max"] == 200 << 20  # the record keeps what was asked


def test_release_of_an_unknown_job_is_refused(ffrtmp: Ffrtmp, state_dir: Path) -> None:
    r = ffrtmp("release", "nosuch")
    assert r.returncode == 1 and r.stderr.strip().startswith("ffrtmp: no running job 'nosuch'")
    assert list(state_dir.rglob("*")) == []


def test_release_works_after_the_wrapper_detached(sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path) -> None:
    """SIGTERM to the wrapper: the record is frozen (detached), the scope runs on with its limits; release
    finds it through systemd and lifts them."""
    proc = sandbox.spawn(["ffrtmp", "run", "--job-id", "det", "--memory-max", "200M", "--", "sleep", "300"],
                         env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL)  # fmt: skip
    host_wrapper, _ = sandbox.inner_pid(proc)
    procs = sandbox.cgroup_file("memory", "/ffrtmp.slice/ffrtmp-det.scope", "cgroup.procs")
    wait_for(lambda: procs.exists() and procs.read_text().split(), what="the workload in the scope")
    pid = int(procs.read_text().split()[0])
    os.kill(host_wrapper, signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert result_of(state_dir, "det")["platform_sla_reason"] == "detached_workload_continues"
    assert effective(pid, "memory", "memory.limit_in_bytes") == str(200 << 20)
    try:
        r = ffrtmp("release", "det")
        assert r.returncode == 0, r.stderr
        assert r.stderr.startswith("ffrtmp: limits of ffrtmp-det.scope lifted (the job's record is frozen")
        assert effective(pid, "memory", "memory.limit_in_bytes") == UNLIMITED
        assert result_of(state_dir, "det")["limits_released_at"] is None  # a frozen record never changes
    finally:
        sandbox.systemctl("kill", "ffrtmp-det.scope")
    wait_for(lambda: not procs.exists(), what="the scope to go")
    r = ffrtmp("release", "det")
    assert (
        r.returncode == 1
        and r.stderr.strip() == "ffrtmp: no running job 'det' (systemd runs no ffrtmp-det.scope)"
    )
