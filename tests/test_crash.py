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

In agent mode (`--mode agent`) the client has no bus connection: its stages are the agent's (the
agent already running when the client starts). bus_silent becomes a silent *agent* (FFRTMP_AGENT_SOCKET
names a socket that accepts and never answers): nothing is recorded, the workload runs ungoverned
(attach: untouched). systemd_frozen is reached once the agent wrote the contract and waits for
systemd. Killed at any later stage, the job is the agent's: it goes on (scope made or not, as systemd
decides), observes the workload to its end and freezes the record once, exit status unknown,
governance_error `client lost: ...`, with no reconcile; a reconcile then changes nothing.
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
from conftest import agent_mode, hold_start_jobs, result_of, scopes, start_job_queued, try_release, wait_for
from helpers import assert_governed, children, nspids
from sandbox import Sandbox

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


# agent mode: (governed, contract) by (mode, stage). The agent goes on after the client's death: a start
# job let go makes the scope; an attach whose start job fails drops its contract (nothing was moved).
AGENT_CASES = {
    ("run", "bus_silent"): (False, False),
    ("attach", "bus_silent"): (False, False),
    ("run", "systemd_frozen"): (True, True),
    ("attach", "systemd_frozen"): (True, True),
    ("run", "start_job_pending"): (True, True),
    ("attach", "start_job_pending"): (True, True),
    ("run", "start_job_fails"): (False, True),
    ("attach", "start_job_fails"): (False, False),
    ("run", "observing"): (True, True),
    ("attach", "observing"): (True, True),
}
# A client killed while its Run or Attach waits for systemd: the agent makes the job all the same and,
# its connection gone, freezes it itself at its end ("client lost").


def holds_pidfd(host: int, pid: int) -> bool:
    """The process with host PID `host` holds a pidfd of the one with host PID `pid`."""
    for info in Path(f"/proc/{host}/fdinfo").glob("*"):
        with contextlib.suppress(OSError):
            if f"\nPid:\t{pid}\n" in info.read_text():
                return True
    return False


def on_bus(sandbox: Sandbox, pid: int) -> bool:
    """The process with this sandbox PID has a connection on the sandbox's bus (dbus-daemon answers)."""
    lines = sandbox.run(["busctl", "list", "--no-legend", "--unique"], timeout=10).stdout.splitlines()
    return any(line.split()[1:2] == [str(pid)] for line in lines)


def ended(sandbox: Sandbox, unit: str) -> bool:
    """The scope is not running (gone, or still loaded but inactive, a moment before systemd collects it)."""
    return sandbox.systemctl("is-active", unit).stdout.strip() in ("inactive", "failed")


def memory_cgroup(host_pid: int) -> str:
    line = next(ln for ln in Path(f"/proc/{host_pid}/cgroup").read_text().splitlines() if ":memory:" in ln)
    return line.split(":", 2)[2]


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


def stuck_in_call(srv: socket.socket) -> socket.socket:
    """Accept the client's connection and read its whole first call (varlink: up to a NUL); never answer."""
    conn, _ = srv.accept()
    conn.settimeout(30)
    got = b""
    while b"\0" not in got:
        chunk = conn.recv(4096)
        assert chunk, f"the client hung up during its call: {got!r}"
        got += chunk
    return conn


class Trial:
    """One wrapper started on a workload that waits for a line on `fifo`, then writes `marker`."""

    def __init__(
        self, sandbox: Sandbox, tmp_path: Path, case: Case, stack: contextlib.ExitStack, agent: bool
    ) -> None:
        self.sb, self.stack, self.tmp, self.agent = sandbox, stack, tmp_path, agent
        if agent:  # the same stage, its outcome as the agent makes it
            case = Case(case.mode, case.stage, *AGENT_CASES[case.mode, case.stage])
        self.case = case
        self.job, self.unit = case.job, f"ffrtmp-{case.job}.scope"
        self.state, self.fifo, self.marker = (tmp_path / n for n in ("state", "go", "marker"))
        os.mkfifo(self.fifo)
        self.err = tmp_path / "wrapper.err"
        self.env = {"FFRTMP_STATE_DIR": str(self.state)}  # the wrapper's
        self.script = f"read x < {self.fifo}; echo done > {self.marker}"
        self.attached: subprocess.Popen[bytes] | None = None
        self.host = self.pid = 0  # the workload's host and sandbox PIDs, once known
        self.origin = ""  # attach: the workload's memory cgroup before the wrapper started

    def reconcile(self) -> subprocess.CompletedProcess[str]:
        return self.sb.run(["ffrtmp", "reconcile"], env={"FFRTMP_STATE_DIR": str(self.state)})


class Stage:
    """How a trial reaches its stage before the kill -9, and how systemd goes on after it."""

    def __init__(self, trial: Trial) -> None:
        self.t = trial

    def prepare(self) -> None:
        """Before the wrapper starts."""

    def reach(self, wrapper_pid: int) -> None:
        """Until the wrapper (`wrapper_pid` in the sandbox) is at this stage."""
        raise NotImplementedError

    def resume(self) -> None:
        """After the kill: systemd goes on as it would."""


class BusSilent(Stage):
    def prepare(self) -> None:
        self.srv = self.t.stack.enter_context(silent_bus(self.t.tmp / "bus"))
        if self.t.agent:  # the client's only peer is the agent: that one is silent
            self.t.env["FFRTMP_AGENT_SOCKET"] = str(self.t.tmp / "bus")
        else:
            self.t.env["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={self.t.tmp / 'bus'}"

    def reach(self, wrapper_pid: int) -> None:
        self.t.stack.enter_context((stuck_in_call if self.t.agent else stuck_in_handshake)(self.srv))


class SystemdFrozen(Stage):
    def prepare(self) -> None:
        if self.t.agent:  # started by its socket now: systemd, stopped, could not start it
            warm = self.t.sb.run(
                ["ffrtmp", "run", "--", "true"], env={"FFRTMP_STATE_DIR": str(self.t.tmp / "w")}
            )
            assert warm.returncode == 0 and ", agent)" in warm.stderr, warm.stderr
            self.agent = agent_host_pid(
                self.t.sb
            )  # read now: systemctl cannot answer while systemd is stopped
        self.t.stack.callback(os.kill, self.t.sb.pid, signal.SIGCONT)  # never leave systemd stopped
        os.kill(self.t.sb.pid, signal.SIGSTOP)

    def reach(self, wrapper_pid: int) -> None:
        if self.t.agent and self.t.case.mode == "attach":  # the agent pinned the PID, then asks systemd
            wait_for(lambda: holds_pidfd(self.agent, self.t.host), what="the agent's pidfd")
        elif self.t.agent:  # the agent wrote the contract, then asked systemd
            wait_for((self.t.state / "jobs" / f"{self.t.job}.json").exists, what="the contract")
        else:
            wait_for(lambda: on_bus(self.t.sb, wrapper_pid), what="the wrapper on the bus")

    def resume(self) -> None:
        os.kill(self.t.sb.pid, signal.SIGCONT)


class StartJobHeld(Stage):
    """The scope's start job waits behind the slice's, which waits for a line on `hold`; `answer`
    lets it go on (0) or fail (1)."""

    answer = "0"

    def prepare(self) -> None:
        self.hold = self.t.tmp / "hold"
        os.mkfifo(self.hold)
        hold_start_jobs(self.t.sb, self.hold)

    def reach(self, wrapper_pid: int) -> None:
        wait_for(lambda: start_job_queued(self.t.sb, self.t.unit), what="the scope's start job")

    def resume(self) -> None:
        wait_for(lambda: try_release(self.hold, self.answer), what="hold")
        wait_for(lambda: not start_job_queued(self.t.sb, self.t.unit), what="the start job to end")


class StartJobFails(StartJobHeld):
    answer = "1"


class Observing(Stage):
    def reach(self, wrapper_pid: int) -> None:
        line = "started in" if self.t.case.mode == "run" else "adopted into"
        wait_for(lambda: line in self.t.err.read_text(), what="the start line")


STAGES: dict[str, type[Stage]] = {
    "bus_silent": BusSilent,
    "systemd_frozen": SystemdFrozen,
    "start_job_pending": StartJobHeld,
    "start_job_fails": StartJobFails,
    "observing": Observing,
}


def start(t: Trial, stage: Stage) -> tuple[subprocess.Popen[bytes], int]:
    """The workload (attach: outside any unit) and its wrapper, at the stage; (wrapper, its host PID)."""
    if t.case.mode == "attach":
        t.attached = t.sb.spawn(["sh", "-c", t.script], stdin=subprocess.DEVNULL)
        t.stack.callback(t.attached.wait, 30)
        t.stack.callback(try_release, t.fifo)
        t.host, t.pid = t.sb.inner_pid(t.attached)
        t.origin = memory_cgroup(t.host)
        cmd = ["attach", "--pid", str(t.pid), "--job-id", t.job, *LIMITS]
    else:
        cmd = ["run", "--job-id", t.job, *LIMITS, "--", "sh", "-c", t.script]
    stage.prepare()
    err = t.stack.enter_context(t.err.open("wb"))
    wrapper = t.sb.spawn(["ffrtmp", *cmd], env=t.env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    t.stack.callback(wrapper.wait, 30)
    t.stack.callback(wrapper.kill)
    wrapper_host, wrapper_pid = t.sb.inner_pid(wrapper)
    stage.reach(wrapper_pid)
    if t.case.mode == "run":
        t.host = wait_for(lambda: children(wrapper_host), what="the forked child")[0]
        t.pid = nspids(t.host)[-1]
    return wrapper, wrapper_host


def check_the_workload_runs_on(t: Trial, pidfd: int) -> None:
    """After the kill, while the workload still waits: alive, governed or untouched, its job left alone."""
    assert t.sb.state() in ("running", "degraded")
    assert not select.select([pidfd], [], [], 0)[0], "the workload died with its wrapper"
    if t.case.governed:
        assert_governed(t.sb, t.job, t.host)  # stays governed while it runs, wrapper or not
    elif t.case.mode == "attach":
        assert memory_cgroup(t.host) == t.origin  # never touched
    else:
        assert "/ffrtmp.slice/" not in memory_cgroup(t.host)  # ran ungoverned
    assert ended(t.sb, t.unit) or t.case.governed

    early = t.reconcile()  # while it runs, reconciliation leaves the job alone
    assert (early.returncode, early.stdout) == (0, "")
    # a kill that landed while the wrapper rewrote its contract left a temp file: swept, one line
    said = [ln for ln in early.stderr.splitlines() if not SWEPT.fullmatch(ln)]
    if t.case.contract:
        assert len(said) == 1 and said[0].startswith(f"ffrtmp: job {t.job} left alone: "), early.stderr
    else:
        assert said == [], early.stderr
    assert (t.state / "jobs" / f"{t.job}.json").exists() == t.case.contract
    assert not (t.state / "results").exists()


def check_reconciled_once(t: Trial) -> None:
    """Exactly one result for a job with a contract, none without; a second pass changes nothing."""
    case, job = t.case, t.job
    first = t.reconcile()
    assert first.returncode == 0, first.stderr
    results = sorted(p.name for p in (t.state / "results").glob("*"))
    assert results == ([f"{job}.json"] if case.contract else [])
    assert list((t.state / "jobs").glob("*")) == []
    if case.contract:
        assert first.stdout.startswith(f"JOB {job} | mode={case.mode} | intent=- | sla=VIOLATION")
        assert "| reason=observer_lost |" in first.stdout and "| exit=- |" in first.stdout
        assert len(first.stdout.splitlines()) == 1
        res = result_of(t.state, job)
        assert (res["platform_sla_reason"], res["platform_sla_compliant"]) == ("observer_lost", False)
        assert (res["mode"], res["pid"], res["unit"]) == (case.mode, t.pid, t.unit)
        assert (res["exit_code"], res["signal"], res["oom_killed"]) == (None, None, False)
        assert res["governed"] is case.governed  # seen by the wrapper, or by the reconcile while it ran
        assert res["start_time"] <= res["end_time"]
    else:  # an attach killed before its contract: no job, no record
        assert (first.stdout, first.stderr) == ("", "")
    before = state_files(t.state)
    second = t.reconcile()
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert state_files(t.state) == before


@pytest.mark.slow  # a sandbox of its own per case
@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.job)
def test_kill_9(
    fresh_sandbox: Sandbox,
    tmp_path: Path,
    case: Case,
    pytestconfig: pytest.Config,
) -> None:
    with contextlib.ExitStack() as stack:
        t = Trial(fresh_sandbox, tmp_path, case, stack, agent_mode(pytestconfig))
        case = t.case
        stage = STAGES[case.stage](t)
        wrapper, wrapper_host = start(t, stage)
        pidfd = os.pidfd_open(t.host)
        stack.callback(os.close, pidfd)
        if case.stage == "observing":
            assert_governed(t.sb, t.job, t.host)
        os.kill(wrapper_host, signal.SIGKILL)
        assert wrapper.wait(timeout=30) != 0
        said = t.err.read_text()
        if case.stage != "observing":  # killed before it got anywhere: it said nothing
            assert said == "", said
        stage.resume()
        check_the_workload_runs_on(t, pidfd)

        assert not t.marker.exists()  # the workload runs to completion
        wait_for(lambda: try_release(t.fifo), what="the workload to read its FIFO")
        assert select.select([pidfd], [], [], 30)[0], "the workload did not end"
        assert t.marker.read_text() == "done\n"
        if t.attached is not None:
            assert t.attached.wait(timeout=30) == 0
    if t.agent:
        check_frozen_by_the_agent(t)
    else:
        wait_for(lambda: t.unit not in scopes(t.sb), what="the scope to go")
        check_reconciled_once(t)
    assert ended(t.sb, t.unit)


def check_frozen_by_the_agent(t: Trial) -> None:
    """Agent mode: a job with a contract is frozen once by the agent, without any reconcile: exit status
    unknown, governance_error `client lost: ...`; a job without one has no record. Then a reconcile
    finds nothing to do and changes nothing."""
    case, job, result = t.case, t.job, t.state / "results" / f"{t.job}.json"
    if case.contract:
        wait_for(result.exists, timeout=30, what="the agent to freeze the record")
        res = result_of(t.state, job)
        assert (res["mode"], res["pid"], res["unit"]) == (case.mode, t.pid, t.unit)
        assert (res["exit_code"], res["signal"], res["governed"]) == (None, None, case.governed)
        if (case.mode, case.stage) == ("attach", "observing"):  # its Finish was sent: frozen as any attach
            assert res["governance_error"] is None
        else:  # its connection closed before its Finish
            assert "client lost: PID " in (res["governance_error"] or ""), res["governance_error"]
        assert res["platform_sla_reason"] != "observer_lost"
    wait_for(lambda: ended(t.sb, t.unit), what="the scope to end")
    wait_for(lambda: not list((t.state / "jobs").glob("*")), what="the contract to go (after the result)")
    assert sorted(p.name for p in (t.state / "results").glob("*")) == (
        [f"{job}.json"] if case.contract else []
    )
    before = state_files(t.state)
    again = t.reconcile()
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert state_files(t.state) == before


# -- the kill -9 matrix of issue 11: the client, the agent, or both, in run and attach ------------------
# Agent mode (`--mode agent`: the sandbox's ffrtmp.socket started; the state dir is the agent's own, as
# on a host set up by the README):
# - client killed: the workload and its scope continue; the agent observes the job to its end and
#   freezes it once, with no reconcile: run's with exit status unknown and governance_error `client
#   lost: ...`; attach's as any attach (its client sends Finish at once and waits for the reply);
# - agent killed: the workload and its scope continue; the client collects the exit status and freezes
#   the record itself, governance_error `observation of UNIT lost ...: agent connection lost at T`;
#   systemd restarts the agent (Restart=on-failure), which leaves the job alone (its client lives);
# - both (client, then agent): the restarted agent resumes the job from its contract (its client is
#   gone, its workload the same process) and freezes it once, `resumed: ...`.
# In-process mode the client is the only host: killed, the job is reconciliation's (`observer_lost`);
# the agent rows have nothing to kill there: only `--mode agent` runs them (marked mode("agent")).
# Every row: then `ffrtmp reconcile` finds nothing to do and changes nothing: exactly one record.


@dataclass(frozen=True)
class Kill:
    mode: str  # run | attach
    who: str  # client | agent | both

    @property
    def job(self) -> str:
        return f"k9-{self.mode}-{self.who}"


KILLS = [
    pytest.param(Kill(m, w), marks=[pytest.mark.mode("agent")] if w != "client" else [])
    for w in ("client", "agent", "both")
    for m in ("run", "attach")
]
RUN_EXIT = 7  # the run workload's status: collected exactly by a client that outlives the agent


def agent_host_pid(sb: Sandbox) -> int:
    """The host PID of the agent's main process (0: not running)."""
    inner = sb.systemctl("show", "-p", "MainPID", "--value", "ffrtmp-agent.service").stdout.strip()
    return sb.host_pid(int(inner)) if inner.isdigit() and inner != "0" else 0


@pytest.mark.slow  # a sandbox of its own per case
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kill", KILLS, ids=lambda k: f"{k.mode}-{k.who}")
def test_kill_9_client_or_agent(
    fresh_sandbox: Sandbox, tmp_path: Path, kill: Kill, pytestconfig: pytest.Config
) -> None:
    sb, job, unit = fresh_sandbox, kill.job, f"ffrtmp-{kill.job}.scope"
    agent = agent_mode(pytestconfig)
    state = sb.agent_state if agent else tmp_path / "state"
    fifo, marker, err_path = tmp_path / "go", tmp_path / "marker", tmp_path / "client.err"
    os.mkfifo(fifo)
    env = {"FFRTMP_STATE_DIR": str(state)}
    script = f"read x < {fifo}; echo done > {marker}; exit {RUN_EXIT if kill.mode == 'run' else 0}"
    with contextlib.ExitStack() as stack, err_path.open("wb") as err:
        stack.callback(try_release, fifo)  # never leave a workload waiting after a failure
        target = None
        if kill.mode == "attach":
            target = sb.spawn(["sh", "-c", script], stdin=subprocess.DEVNULL)
            stack.callback(target.wait, 30)
            host, pid = sb.inner_pid(target)
            cmd = ["attach", "--pid", str(pid), "--job-id", job, *LIMITS]
        else:
            cmd = ["run", "--job-id", job, *LIMITS, "--", "sh", "-c", script]
        client = sb.spawn(["ffrtmp", *cmd], env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        stack.callback(client.wait, 30)
        stack.callback(client.kill)  # a no-op once it is reaped
        client_host = sb.inner_pid(client)[0]
        line = "started in" if kill.mode == "run" else "adopted into"
        wait_for(lambda: line in err_path.read_text(), timeout=30, what="the start line")
        if kill.mode == "run":
            assert f"started in {unit} (pid " in err_path.read_text()
            assert err_path.read_text().split("\n")[0].endswith(", agent)" if agent else ", in-process)")
            host = children(client_host)[0]
            pid = nspids(host)[-1]
        pidfd = os.pidfd_open(host)
        stack.callback(os.close, pidfd)
        assert_governed(sb, job, host)
        first_agent = agent_host_pid(sb) if agent else 0
        assert bool(first_agent) == agent  # in-process mode: no agent runs at all

        if kill.who in ("client", "both"):
            os.kill(client_host, signal.SIGKILL)
            assert client.wait(timeout=30) == -signal.SIGKILL
        if kill.who in ("agent", "both"):
            os.kill(first_agent, signal.SIGKILL)
            # systemd restarts it (Restart=on-failure): a fresh agent, which resumes or leaves the job
            wait_for(lambda: agent_host_pid(sb) not in (0, first_agent), timeout=30, what="the agent again")
            wait_for(lambda: sb.systemctl("is-active", "ffrtmp-agent.service").stdout.strip() == "active",
                     timeout=30, what="the restarted agent ready")  # fmt: skip

        # the workload runs on, governed, its job not frozen by anyone yet
        assert not select.select([pidfd], [], [], 0)[0], "the workload died"
        assert_governed(sb, job, host)
        assert not (state / "results" / f"{job}.json").exists()
        assert (state / "jobs" / f"{job}.json").exists()
        if kill.who == "agent":
            assert client.poll() is None, "the client died with the agent"

        assert not marker.exists()
        wait_for(lambda: try_release(fifo), what="the workload to read its FIFO")
        assert select.select([pidfd], [], [], 30)[0], "the workload did not end"
        assert marker.read_text() == "done\n"
        if target is not None:
            assert target.wait(timeout=30) == 0
        if kill.who == "agent":  # the client collects the status and freezes the record
            assert client.wait(timeout=30) == (RUN_EXIT if kill.mode == "run" else 0)
    said = err_path.read_text()
    assert "Traceback" not in said, said

    result = state / "results" / f"{job}.json"
    if agent:  # frozen by a host, without any reconcile
        wait_for(result.exists, timeout=30, what="the record")
    else:  # in-process, the client killed: nobody observes; once the scope is gone, reconciliation
        wait_for(lambda: unit not in scopes(sb), what="the scope to go")
        assert not result.exists()
        r = sb.run(["ffrtmp", "reconcile"], env=env)
        assert r.returncode == 0 and "| reason=observer_lost |" in r.stdout, r.stdout + r.stderr
    res = result_of(state, job)
    assert (res["job_id"], res["mode"], res["pid"], res["unit"]) == (job, kill.mode, pid, unit)
    assert res["governed"] is True
    error = res["governance_error"] or ""
    if not agent:
        assert (res["platform_sla_reason"], res["exit_code"]) == ("observer_lost", None)
    elif kill.who == "client" and kill.mode == "attach":  # by the agent: the client had sent its Finish
        assert res["governance_error"] is None  # (attach's client sends it at once and waits for the reply)
        assert (res["exit_code"], res["platform_sla_reason"]) == (None, "completed_within_limits")
    elif kill.who == "client":  # by the agent: the client's connection closed before its Finish
        assert error.startswith("client lost: PID ") and "exit status unknown" in error, error
        assert res["exit_code"] is None and res["platform_sla_reason"] != "observer_lost"
    elif kill.who == "agent":  # by the client, with the exit status it collected
        assert "agent connection lost at " in error, error
        assert res["exit_code"] == (RUN_EXIT if kill.mode == "run" else None)
        summary = [ln for ln in said.splitlines() if ln.startswith(f"JOB {job} |")]
        assert len(summary) == 1, said
    else:  # by the restarted agent, resumed from the contract
        assert error.startswith("resumed: wrapper PID ") and "exit status unknown" in error, error
        assert res["exit_code"] is None
    # exactly once: nothing left to reconcile, nothing changes
    wait_for(lambda: not list((state / "jobs").glob("*")), what="the contract to go (after the result)")
    wait_for(lambda: ended(sb, unit), what="the scope to end")
    before = state_files(state)
    again = sb.run(["ffrtmp", "reconcile"], env=env)
    assert (again.returncode, again.stdout) == (0, ""), again.stderr
    assert state_files(state) == before
    assert [p.name for p in (state / "results").glob(f"{job}*")] == [f"{job}.json"]
