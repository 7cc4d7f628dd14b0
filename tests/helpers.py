"""Plain helpers shared by the tests, the sandbox and the benchmark (no fixtures). Test bed ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from sandbox import Sandbox

T = TypeVar("T")
MiB = 1024 * 1024
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 10, what: str = "condition", every: float = 0.02
) -> T:
    """Wait (in the test, not in the product) until `predicate()` is true; returns that true value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)
    return value


def read_until(proc: subprocess.Popen[bytes], marker: str) -> list[str]:
    """Read a wrapper's stderr up to the line containing `marker` (e.g. "started in", "adopted into")."""
    assert proc.stderr is not None
    lines: list[str] = []
    while not lines or marker not in lines[-1]:
        line = proc.stderr.readline().decode()
        assert line, f"the wrapper ended before {marker!r}: {lines}"
        lines.append(line.rstrip("\n"))
    return lines


def wakeups(pid: int) -> dict[str, int]:
    """Context switches (voluntary and not) of each thread the process has now, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            lines = (task / "status").read_text().splitlines()
            out[task.name] = sum(int(ln.split()[1]) for ln in lines if "ctxt_switches:" in ln)
    return out


def free_port() -> int:
    """A loopback TCP port no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The PIDs of a process's children (of its main thread), [] if it is gone."""
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def nspids(host_pid: int) -> list[int]:
    """A process's PID in each PID namespace it is in, the host's first, its own (innermost) last."""
    status = Path(f"/proc/{host_pid}/status").read_text().splitlines()
    return [int(p) for p in next(ln for ln in status if ln.startswith("NSpid:")).split()[1:]]


def get(url: str, timeout: float = 10) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def samples(text: str) -> Samples:
    """Prometheus text format -> {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(s: Samples, name: str, **labels: str) -> float | None:
    return s.get((name, frozenset(labels.items())))


def assert_clean_stderr(lines: list[str]) -> None:
    """A wrapper's stderr: one line per message (`ffrtmp: ...`, the summary), never a traceback."""
    assert not [ln for ln in lines if not ln.startswith(("ffrtmp: ", "JOB "))], lines


def ffrtmp_scopes(sandbox: Sandbox, state: str | None = None) -> list[str]:
    """The ffrtmp scopes systemd has loaded (only those in `state`, e.g. active, if given)."""
    r = sandbox.systemctl("list-units", "--all", "--plain", "--no-legend", "ffrtmp-*")
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()]
    return sorted(r[0] for r in rows if r[0].endswith(".scope") and (state is None or r[2] == state))


def start_governed(
    sandbox: Sandbox, state_dir: Path, args: list[str], job: str, controller: str = "memory", **kw: object
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`ffrtmp ARGS...` started in the sandbox (stderr discarded unless told otherwise); once the scope of
    `job` holds a process: (the wrapper, its host PID, the scope's `cgroup.procs` of `controller`)."""
    kw.setdefault("stderr", subprocess.DEVNULL)
    proc = sandbox.spawn(["ffrtmp", *args], env={"FFRTMP_STATE_DIR": str(state_dir)}, **kw)
    procs = sandbox.cgroup_file(controller, f"/ffrtmp.slice/ffrtmp-{job}.scope", "cgroup.procs")
    wait_for(lambda: procs.exists() and procs.read_text().strip(), what=f"the scope of job {job}")
    return proc, sandbox.inner_pid(proc)[0], procs


def assert_governed(
    sandbox: Sandbox, job: str, host_pid: int, memory: int = 64 * MiB, cpu_quota_us: int = 50000
) -> None:
    """Running in its active scope, with its limits in the cgroup files (cgroup files list host PIDs)."""
    unit = f"ffrtmp-{job}.scope"
    cg = f"/ffrtmp.slice/{unit}"
    assert sandbox.systemctl("is-active", unit).stdout.strip() == "active"
    cgroups = Path(f"/proc/{host_pid}/cgroup").read_text().splitlines()
    assert next(ln for ln in cgroups if ":memory:" in ln).endswith(cg), cgroups
    for controller in ("memory", "cpu"):
        assert str(host_pid) in sandbox.cgroup_file(controller, cg, "cgroup.procs").read_text().split()
    assert sandbox.cgroup_file("memory", cg, "memory.limit_in_bytes").read_text().strip() == str(memory)
    assert sandbox.cgroup_file("cpu", cg, "cpu.cfs_quota_us").read_text().strip() == str(cpu_quota_us)
