"""Bad input through the real CLI: one line naming the problem, the documented status, nothing created."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import ffrtmp_scopes
from sandbox import REPO, Sandbox

# The documented statuses: `run` 125 for its own errors and invalid options, 126 cannot execute,
# 127 not found; `attach` 1 refused or gone, 2 usage.
RUN, NOEXEC, NOTFOUND, REFUSED, USAGE = 125, 126, 127, 1, 2
JOB_ID_HINT = ": use 1-100 of A-Z a-z 0-9 _ . : - (not starting with _ . : -)"


@dataclass(frozen=True)
class Case:
    """`ffrtmp ARGV...` fails with `status` and the one stderr line `ffrtmp: MESSAGE...`.

    `{name}` in ARGV or MESSAGE is a target of the `Targets` below; `where` is `sandbox` (run inside),
    `shell` (ARGV[0] is a sh script run inside) or `host` (run on the host, bus of the sandbox).
    """

    id: str
    argv: tuple[str, ...]
    status: int
    message: str
    where: str = "sandbox"
    execs: bool = False  # the command is forked and put in a scope before exec fails: the scope flashes


def run_(*opts: str, job: str = "bad", cmd: tuple[str, ...] = ("touch", "{ran}")) -> tuple[str, ...]:
    """`run` of a workload that would leave a file behind if it ever ran."""
    return ("run", "--job-id", job, *opts, "--", *cmd)


def attach_(*opts: str, pid: str = "{live}", job: str = "bad") -> tuple[str, ...]:
    """`attach` of a live process outside any unit unless told otherwise."""
    return ("attach", "--pid", pid, "--job-id", job, *opts)


def bad_id(job: str, attach: bool = False) -> Case:
    argv = attach_(job=job) if attach else run_(job=job)
    name = f"{'attach' if attach else 'run'}-job-id-{job[:12]!r}"
    return Case(name, argv, USAGE if attach else RUN, f"invalid job id {job!r}{JOB_ID_HINT}")


def limit(option: str, value: str, message: str, attach: bool = False) -> Case:
    name = f"{'attach' if attach else 'run'}{option}={value[:24]}"
    argv = attach_(option, value) if attach else run_(option, value)
    return Case(name, argv, USAGE if attach else RUN, message)


SIZE_HINT = "(bytes, or with K/M/G/T suffix, or max)"
CPU_MAX_HINT = "(QUOTA|max [PERIOD], in µs, PERIOD 1000..1000000)"
QUOTA_HINT = "(of one core, > 0, e.g. 50 or 12.5)"
KEYS_HINT = "(rbps=, wbps=, riops=, wiops=)"

CASES = [
    # --- job ids and limits: their parsing is tested value by value in test_limits.py; here one of
    # each kind goes through the real CLI, for its one line, its exit status and nothing left behind
    *(bad_id(j) for j in ("../x", "a\nb", "x" * 101)),
    bad_id("", attach=True),
    limit("--memory-max", "12Q", f"--memory-max: invalid size '12Q' {SIZE_HINT}"),
    limit("--cpu-quota", "50%", f"--cpu-quota: invalid percentage '50%' {QUOTA_HINT}"),
    limit("--cpu-max", "50000/100000", f"--cpu-max: invalid value '50000/100000' {CPU_MAX_HINT}"),
    limit("--cpu-weight", "10001", "--cpu-weight: invalid weight '10001' (1..10000)"),
    limit("--io-weight", "0", "--io-weight: invalid weight '0' (1..10000)"),
    limit("--io-max", "/dev/no-such-disk rbps=1M", "--io-max: no block device '/dev/no-such-disk'"),
    limit("--io-max", "/dev/null speed=1M", f"--io-max: unknown key 'speed=1M' {KEYS_HINT}"),
    Case("run-cpu-max-and-cpu-quota", run_("--cpu-max", "max", "--cpu-quota", "50"), RUN,
         "--cpu-max and --cpu-quota are exclusive"),
    limit("--memory-max", "12Q", f"--memory-max: invalid size '12Q' {SIZE_HINT}", attach=True),
    limit("--io-max", "/dev/nodisk rbps=1M", "--io-max: no block device '/dev/nodisk'", attach=True),
    Case("run-unknown-option", run_("--cpu-limit", "50"), RUN, "No such option: --cpu-limit"),
    Case("attach-unknown-option", attach_("--cpu-limit", "50"), USAGE, "No such option: --cpu-limit"),
    # --- PIDs ----------------------------------------------------------------------------------------
    Case("pid-0", attach_(pid="0"), USAGE, "invalid PID 0: must be a positive number"),
    Case("pid--1", attach_(pid="-1"), USAGE, "invalid PID -1: must be a positive number"),
    Case("pid-not-a-number", attach_(pid="12abc"), USAGE, "Invalid value for '--pid'"),
    Case("pid-missing", ("attach", "--job-id", "bad"), USAGE, "Missing option '--pid'."),
    Case("pid-1", attach_(pid="1"), REFUSED, "refusing PID 1: the init process cannot be adopted"),
    Case("pid-self", ("exec ffrtmp attach --job-id bad --pid $$",), REFUSED,
         "refusing PID {self}: it is this wrapper or one of its ancestors", "shell"),
    Case("pid-parent", ("ffrtmp attach --job-id bad --pid $$; exit $?",), REFUSED,
         "refusing PID {self}: it is this wrapper or one of its ancestors", "shell"),
    Case("pid-gone", attach_(pid="{gone}"), REFUSED, "no process with PID {gone}"),
    Case("pid-beyond-pid-max", attach_(pid="4194305"), REFUSED, "no process with PID 4194305"),
    Case("pid-zombie", attach_(pid="{zombie}"), REFUSED,
         "refusing PID {zombie}: it has already exited (zombie)"),
    Case("pid-thread", attach_(pid="{thread}"), REFUSED,
         "refusing PID {thread}: it is a thread of process {threads}, not a process"),
    Case("pid-kernel-thread", attach_(pid="{kthread}"), REFUSED,
         "refusing PID {kthread}: it is a kernel thread", "host"),
    Case("pid-already-governed", attach_(pid="{governed}"), REFUSED,
         "PID {governed} is already governed by job 'holder' (ffrtmp-holder.scope)"),
    Case("pid-of-a-service", attach_(pid="{service}"), REFUSED,
         "PID {service} belongs to badinput-svc.service: moving it out cannot be undone (use --force"),
    # --- commands ------------------------------------------------------------------------------------
    Case("cmd-not-found", run_(cmd=("no-such-command-ffrtmp",)), NOTFOUND,
         "cannot execute 'no-such-command-ffrtmp': No such file or directory", execs=True),
    Case("cmd-path-not-found", run_(cmd=("/nonexistent/ffmpeg", "-i", "x")), NOTFOUND,
         "cannot execute '/nonexistent/ffmpeg': No such file or directory", execs=True),
    Case("cmd-empty", run_(cmd=("",)), NOTFOUND, "cannot execute '': No such file or directory", execs=True),
    Case("cmd-bad-interpreter", run_(cmd=("{badshebang}",)), NOTFOUND,
         "cannot execute '{badshebang}': No such file or directory", execs=True),
    Case("cmd-not-executable", run_(cmd=("{noexec}",)), NOEXEC,
         "cannot execute '{noexec}': Permission denied", execs=True),
    Case("cmd-directory", run_(cmd=("{dir}",)), NOEXEC,
         "cannot execute '{dir}': Permission denied", execs=True),
    Case("cmd-missing", ("run", "--job-id", "bad", "--"), RUN, "Missing argument 'command'."),
    Case("cmd-missing-no-dashes", ("run", "--job-id", "bad"), RUN, "Missing argument 'command'."),
]  # fmt: skip


# A process that leaves an unreaped child (a zombie) and prints its PID; one that prints a thread's id.
ZOMBIE = """import os, time
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
print(pid, flush=True)
time.sleep(600)
"""
THREAD = """import os, threading, time
t = threading.Thread(target=time.sleep, args=(600,), daemon=True)
t.start()
print(t.native_id, os.getpid(), flush=True)
t.join()
"""


class Targets:
    """What the cases point at: processes inside the sandbox (PIDs as seen there) and files."""

    def __init__(self, sandbox: Sandbox, tmp: Path) -> None:
        self.sb, self.procs = sandbox, list[subprocess.Popen[bytes]]()
        self.values = {"ran": str(tmp / "ran"), "kthread": str(_kernel_thread())}
        live = self._spawn(["sleep", "600"])
        self.values["live"] = str(sandbox.inner_pid(live)[1])
        self.values["gone"] = sandbox.run(["sh", "-c", "true & echo $!; wait"]).stdout.strip()
        self.values["zombie"] = self._line([sys.executable, "-c", ZOMBIE])
        self.values["thread"], self.values["threads"] = self._line([sys.executable, "-c", THREAD]).split()
        pid = tmp / "holder.pid"
        holder = self._spawn(["ffrtmp", "run", "--job-id", "holder", "--state-dir", str(tmp / "holder-state"),
                              "--", "sh", "-c", f"echo $$ > {pid}; exec sleep 600"])  # fmt: skip
        wait_for(lambda: pid.is_file() and pid.read_text().endswith("\n"), what="the governed workload")
        self.values["governed"] = pid.read_text().strip()
        assert holder.poll() is None
        r = sandbox.run(["systemd-run", "-q", "--unit=badinput-svc", "sleep", "600"])
        assert r.returncode == 0, r.stderr
        main_pid = sandbox.systemctl("show", "-P", "MainPID", "badinput-svc.service")
        self.values["service"] = main_pid.stdout.strip()
        files = tmp / "files"
        files.mkdir()
        (files / "noexec").write_text(f"#!/bin/sh\ntouch {self.values['ran']}\n")
        (files / "badshebang").write_text(f"#!/nonexistent/sh\ntouch {self.values['ran']}\n")
        (files / "badshebang").chmod(0o755)
        (files / "dir").mkdir()
        self.values |= {name: str(files / name) for name in ("noexec", "badshebang", "dir")}

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.procs.append(self.sb.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        return self.procs[-1]

    def _line(self, cmd: list[str]) -> str:
        proc = self._spawn(cmd)
        assert proc.stdout is not None
        return proc.stdout.readline().decode().strip()

    def fill(self, text: str) -> str:
        for name, value in self.values.items():
            text = text.replace("{" + name + "}", value)
        return text

    def close(self) -> None:
        self.sb.systemctl("kill", "--signal=KILL", "ffrtmp-holder.scope", "badinput-svc.service")
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _kernel_thread() -> int:
    """A kernel thread visible on the host (kthreadd is PID 2 almost everywhere); 0 if none is."""
    for pid in [2, *sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[6]) & 0x00200000:
            return pid
    return 0


@pytest.fixture(scope="module")
def targets(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    t = Targets(sandbox, tmp_path_factory.mktemp("targets"))
    try:
        yield t
    finally:
        t.close()


def _invoke(case: Case, sandbox: Sandbox, targets: Targets, state: Path) -> subprocess.CompletedProcess[str]:
    env = {"FFRTMP_STATE_DIR": str(state)}
    argv = [targets.fill(a) for a in case.argv]
    if case.where == "shell":
        return sandbox.run(["sh", "-c", f"echo $$ >&2; {argv[0]}"], env=env, timeout=30)
    if case.where == "host":
        if targets.values["kthread"] == "0":
            pytest.skip("no kernel thread visible on this host")
        host_env = sandbox.env(env)  # the sandbox's bus: a bug that reached D-Bus would show there
        cmd = [str(REPO / ".venv" / "bin" / "ffrtmp"), *argv]
        return subprocess.run(cmd, env=host_env, capture_output=True, text=True, timeout=30)
    return sandbox.run(["ffrtmp", *argv], env=env, timeout=30)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, sandbox: Sandbox, targets: Targets, tmp_path: Path) -> None:
    before = ffrtmp_scopes(sandbox)
    state = tmp_path / "state"
    r = _invoke(case, sandbox, targets, state)
    lines = r.stderr.splitlines()
    if case.where == "shell":  # the shell printed its own PID first
        targets.values["self"] = lines.pop(0)
    assert len(lines) == 1, r.stderr  # exactly one line, naming the problem
    assert lines[0].startswith(f"ffrtmp: {targets.fill(case.message)}"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.returncode == case.status, r.stderr
    # nothing created: no file in the state dir, no workload ran, no scope (one that flashed is gone)
    assert not state.exists() or [p for p in state.rglob("*") if not p.is_dir()] == []
    assert not Path(targets.values["ran"]).exists()
    if case.execs:
        wait_for(lambda: ffrtmp_scopes(sandbox) == before, what="the failed command's scope to go")
    assert ffrtmp_scopes(sandbox) == before


def test_the_matrix_has_every_status_and_its_targets_are_what_they_claim(
    sandbox: Sandbox, targets: Targets
) -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.status for c in CASES} == {RUN, NOEXEC, NOTFOUND, REFUSED, USAGE}
    v = targets.values
    state = sandbox.run(["sh", "-c", f"grep State: /proc/{v['zombie']}/status"]).stdout
    assert "zombie" in state
    assert sandbox.run(["test", "-e", f"/proc/{v['gone']}"]).returncode == 1
    assert ffrtmp_scopes(sandbox) == ["ffrtmp-holder.scope"]
    cgroup = sandbox.run(["cat", f"/proc/{v['governed']}/cgroup"]).stdout
    assert "/ffrtmp.slice/ffrtmp-holder.scope" in cgroup
    assert os.path.isdir(v["dir"]) and not os.access(v["noexec"], os.X_OK)
