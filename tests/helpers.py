"""Plain helpers shared by the tests, the sandbox and the benchmark (no fixtures). Test bed ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from ffrtmp_systemd.report.result import Contract, Mode, Outcome, Result, freeze

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


def block_devices() -> list[tuple[str, str]]:
    """(a /dev path that is the block device, its MAJ:MIN) for each disk in /sys/block with a /dev node."""
    found = []
    for dev in sorted(Path("/sys/block").glob("*/dev")):
        mm = dev.read_text().strip()
        for path in (f"/dev/block/{mm}", f"/dev/{dev.parent.name}"):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == mm:
                found.append((path, mm))
                break
    return found


BLOCK = block_devices()
need_block = pytest.mark.skipif(not BLOCK, reason="no block device in /sys/block with a /dev node")


# A record as the tests build it by hand (the golden one pins the schema).
T0 = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)


def contract(**kw: object) -> Contract:
    base: dict[str, object] = dict(
        job_id="job-1",
        mode=Mode.RUN,
        pid=4242,
        unit="ffrtmp-job-1.scope",
        limits={"cpu_quota": "200%", "memory_max": 536870912},
        intent="transcode",
        wrapper_pid=4241,
        start_time="2026-11-30T12:00:00.000000Z",
        command=["ffmpeg", "-i", "in.mp4", "out.mp4"],
    )
    return Contract(**(base | kw))  # type: ignore[arg-type]


def golden_result() -> Result:
    c = contract(limits_released_at="2026-11-30T12:01:00.000000Z")
    o = Outcome(end_time=T0 + timedelta(seconds=90, microseconds=123456), exit_code=0)
    return replace(freeze(c, o, governed=True, governance_error=None), wrapper_version="0.1.0")


# The exporter in a sandbox and a real Prometheus scraping it.
HOG = "b = bytearray(0)\nwhile True: b += bytearray(16 << 20)"  # grows until the OOM killer acts


class Exporter:
    """`ffrtmp exporter` running inside the sandbox on a free loopback port."""

    def __init__(self, sandbox: Sandbox, state_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        listen = self.url.removeprefix("http://")
        cmd = ["ffrtmp", "exporter", "--listen", listen, "--state-dir", str(state_dir)]
        self.proc = sandbox.spawn(cmd, stderr=subprocess.PIPE)
        self.host_pid = sandbox.inner_pid(self.proc)[0]
        wait_for(self.healthy, timeout=20, what="the exporter to serve /healthz")

    def healthy(self) -> bool:
        try:
            return get(f"{self.url}/healthz")[0] == 200
        except OSError:
            return False

    def metrics(self) -> Samples:
        status, _, body = get(f"{self.url}/metrics")
        assert status == 200
        return samples(body)

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as systemd stops it; (exit status, stderr)."""
        if self.proc.poll() is None:
            os.kill(self.host_pid, signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, err.decode()


def promql(base: str, query: str) -> list[dict[str, object]]:
    status, _, body = get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "success", body
    return list(doc["data"]["result"])


def scalar(base: str, query: str) -> float | None:
    res = promql(base, query)
    return float(res[0]["value"][1]) if res else None  # type: ignore[index]


@contextlib.contextmanager
def prometheus(tmp_path: Path, exporter: Exporter, rules: Path | None = None) -> Iterator[str]:
    """A real Prometheus scraping the exporter every second (scrape job "ffrtmp", as the README says),
    evaluating `rules` every second; yields its base URL."""
    target = exporter.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        + (f"rule_files: ['{rules}']\n" if rules else "")
        + f"scrape_configs: [{{job_name: ffrtmp, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    log, port = tmp_path / "prometheus.log", free_port()
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:  # ours, not another test's that took the port first (other worktrees run the same tests)
        wait_for(lambda: prom.poll() is not None or ours(base, tmp_path), timeout=60, what="prometheus")
        assert prom.poll() is None, log.read_text()
        yield base
        assert prom.poll() is None, log.read_text()
    finally:
        prom.terminate()
        prom.wait(timeout=30)


def ours(base: str, tmp_path: Path) -> bool:
    """The Prometheus answering at `base` is the one keeping its data under `tmp_path`."""
    try:
        flags = json.loads(get(f"{base}/api/v1/status/flags")[2])["data"]
    except (OSError, ValueError, KeyError):
        return False
    return bool(flags.get("storage.tsdb.path") == str(tmp_path / "tsdb"))


def scraped(base: str, query: str) -> bool:
    """The query has a result (Prometheus may still be starting)."""
    try:
        return bool(promql(base, query))
    except (OSError, AssertionError, json.JSONDecodeError):
        return False


def untrust(d: Path, how: str) -> str:
    """Make a directory someone else's (`chown`) or writable by all (`chmod`); what a refusal says of it."""
    if how == "chmod":
        d.chmod(0o777)
        why = "writable by group or others, mode 0777"
    else:
        os.chown(d, 4242, 4242)
        why = "owned by uid 4242"
    return f"refusing state directory {d} ({why}): no record is kept there"
