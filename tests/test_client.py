"""The thin client: its imports, its reading of the command line next to the typer CLI's, who governs
(the agent or this process), and what happens when the agent or the client is killed mid-job."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import result_of, scopes, try_release
from helpers import read_until, wait_for, wakeups
from sandbox import REPO, Sandbox

# Each test starts the agent it talks to (--socket) or none: the same in either test mode, run once.
pytestmark = [pytest.mark.sandbox, pytest.mark.mode("in-process")]
HEAVY = ("typer", "click", "asyncio", "dbus_next", "prometheus_client", "ffrtmp_systemd.cli")
# Nor the heavier parts of the standard library, nor the record layer, while the agent answers: a waiting
# client's private memory is per job (each of these costs 0.4 to 2.7 MiB). pathlib is checked in
# test_the_client_module_imports_little: the .venv's editable install imports it at start-up.
LIGHT = ("dataclasses", "inspect", "typing", "datetime", "pathlib", "ffrtmp_systemd.presentation")
LIGHT += ("ffrtmp_systemd.report", "ffrtmp_systemd.agent", "ffrtmp_systemd.wrapper", "ffrtmp_systemd.systemd")


class Agent:
    """`ffrtmp agent --socket PATH` inside the sandbox; `env` points a client at it."""

    def __init__(self, sandbox: Sandbox, state_dir: Path) -> None:
        self.path = state_dir.parent / "agent.sock"
        cmd = [
            "ffrtmp",
            "agent",
            "--listen",
            "none",
            "--socket",
            str(self.path),
            "--state-dir",
            str(state_dir),
        ]
        self.proc = sandbox.spawn(cmd, stderr=subprocess.PIPE)
        self.host_pid = sandbox.inner_pid(self.proc)[0]
        wait_for(self.listening, what="the agent to listen")  # bound is not yet listening
        self.env = {"FFRTMP_STATE_DIR": str(state_dir), "FFRTMP_AGENT_SOCKET": str(self.path)}

    def listening(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(self.path)) == 0

    def kill(self) -> None:
        os.kill(self.host_pid, signal.SIGKILL)
        self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def agent(sandbox: Sandbox, state_dir: Path) -> Iterator[Agent]:
    a = Agent(sandbox, state_dir)
    yield a
    a.stop()


def imported(stderr: str) -> set[str]:
    """The modules `-X importtime` (PYTHONPROFILEIMPORTTIME) saw imported, from its lines on fd 2."""
    return {ln.split("|")[-1].strip() for ln in stderr.splitlines() if ln.startswith("import time:")}


def after_start_up(stderr: str) -> set[str]:
    """The modules imported once the interpreter's start-up (site, .pth files) was done: the program's."""
    names = [ln.split("|")[-1].rstrip() for ln in stderr.splitlines() if ln.startswith("import time:")]
    return {n.strip() for n in names[names.index(" site") + 1 :]} if " site" in names else set(names)


def too_heavy(seen: set[str]) -> set[str]:
    return {m for m in seen if any(m == h or m.startswith(f"{h}.") for h in (*HEAVY, *LIGHT))}


def test_the_client_module_imports_little() -> None:
    """What `import ffrtmp_systemd.client` loads, without site: the standard library's lighter modules."""
    code = "import sys; old = set(sys.modules); import ffrtmp_systemd.client; print(*set(sys.modules) - old)"
    r = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, check=True)  # fmt: skip
    seen = set(r.stdout.split())
    assert "ffrtmp_systemd.varlink" in seen and too_heavy(seen) == set(), too_heavy(seen)


def test_run_through_the_agent_imports_only_the_standard_library(
    sandbox: Sandbox, agent: Agent, state_dir: Path
) -> None:
    env = {**agent.env, "PYTHONPROFILEIMPORTTIME": "1"}
    r = sandbox.run(["ffrtmp", "run", "--job-id", "light", "--cpu-quota", "50", "--", "true"], env=env)
    assert r.returncode == 0, r.stderr
    assert "ffrtmp: job light started in ffrtmp-light.scope (pid " in r.stderr and ", agent)" in r.stderr
    seen = after_start_up(r.stderr)
    assert "ffrtmp_systemd.client" in seen and "ffrtmp_systemd.varlink" in seen  # the detector sees
    assert too_heavy(seen) - {"pathlib"} == set(), too_heavy(seen)
    assert result_of(state_dir, "light")["governed"] is True
    # ... and it would see them: --help is the typer CLI's
    r = sandbox.run(["ffrtmp", "run", "--help"], env=env)
    assert r.returncode == 0 and "typer" in imported(r.stderr)


def test_without_an_agent_the_start_line_says_in_process(sandbox: Sandbox, state_dir: Path) -> None:
    for none in ("none", "", str(state_dir / "no-such.sock")):
        env = {"FFRTMP_STATE_DIR": str(state_dir), "FFRTMP_AGENT_SOCKET": none}
        r = sandbox.run(["ffrtmp", "run", "--", "sh", "-c", "exit 4"], env=env)
        assert r.returncode == 4, r.stderr
        first = r.stderr.splitlines()[0]
        line = r"ffrtmp: job \S+ started in ffrtmp-\S+\.scope \(pid \d+, in-process\)"
        assert re.fullmatch(line, first), first


# Each invocation as the thin client reads it and as the typer CLI does (a script named ffrtmp that
# calls cli.main): the same status, the same lines (digits aside: pids, times, generated ids).
PARITY = [
    ["run", "--job-id", "p1", "--", "sh", "-c", "exit 3"],
    ["run", "--job-id=p2", "--cpu-quota=50", "--memory-max", "64M", "--cpu-weight", "200", "--", "true"],
    ["run", "--job-id", "p3", "true", "--cpu-quota", "5"],  # the command starts at its first word
    ["run", "--job-id", "p4", "--intent", "-x", "--", "true"],  # a value may start with a dash
    ["run", "--job-id", "p5", "--job-id", "p6", "--", "true"],  # the last one wins
    ["run", "--job-id", "p7", "--", "/no/such/program"],
    ["run", "--job-id", "p8", "--", "--"],
    ["--user", "run", "--job-id", "p9", "--", "true"],  # no user bus here: ungoverned, said so
    ["run", "--bogus", "--", "true"],
    ["run"],
    ["run", "--"],
    ["run", "--job-id"],
    ["run", "--job-id", "../x", "--", "true"],
    ["run", "--job-id=", "--", "true"],
    ["run", "--cpu-quota", "abc", "--", "true"],
    ["run", "--cpu-max", "1 2", "--cpu-quota", "5", "--", "true"],
    ["run", "--io-max", "/no/dev rbps=1", "--", "true"],
    ["run", "--intent", "a|b", "--", "true"],
    ["run", "--state-dir=", "--", "true"],
    ["run", "--user", "--", "true"],
    ["run", "-x", "--", "true"],
    ["run", "--help"],
    ["--version"],
    ["attach"],
    ["attach", "--pid", "abc"],
    ["attach", "--pid=0"],
    ["attach", "--pid", "1"],
    ["attach", "--pid", "4194303"],
    ["attach", "--pid", "5", "extra"],
    ["attach", "--force=1", "--pid", "5"],
    ["attach", "--pid", "5", "--memory-max", "12Q"],
    ["attach", "--pid", "5", "--intent", "a\rb"],
    ["show", "nope"],
]


def test_the_thin_client_reads_the_command_line_as_the_typer_cli(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory inside the sandbox: `--state-dir=` is "." there
    typer_cli = tmp_path / "typer" / "ffrtmp"
    typer_cli.parent.mkdir()
    typer_cli.write_text(f"#!{REPO}/.venv/bin/python\nfrom ffrtmp_systemd.cli import main\nmain()\n")
    typer_cli.chmod(0o755)
    norm = re.compile(r"\d{8}T\d{6}-[0-9a-f]{6}|\d+")  # generated job ids, then any number
    for i, args in enumerate(PARITY):
        seen = []
        for how, exe in (("thin", "ffrtmp"), ("typer", str(typer_cli))):
            state = tmp_path / f"{how}-{i}"
            env = {"FFRTMP_STATE_DIR": str(state), "FFRTMP_AGENT_SOCKET": "none"}
            r = sandbox.run([exe, *args], env=env)
            jobs = sorted(p.name for p in (state / "results").glob("*.json")) if state.exists() else []
            record = result_of(state, jobs[0][:-5]) if jobs else {}
            fields = ("job_id", "exit_code", "governed", "limits", "intent", "command", "platform_sla_reason")
            seen.append(
                (
                    r.returncode,
                    norm.sub("N", r.stderr.replace(str(state), "STATE")),
                    r.stdout,
                    [record.get(k) for k in fields],
                )
            )
        assert seen[0] == seen[1], (args, seen)


def test_kill_9_of_the_agent_mid_run(sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path) -> None:
    """The workload and its scope go on; the client collects the exit status and freezes the record once,
    saying the observation was lost; no reconnect."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cmd = ["ffrtmp", "run", "--job-id", "ak", "--memory-max", "64M", "--"]
    cmd += ["sh", "-c", f"read x < {fifo}; exit 7"]
    proc = sandbox.spawn(cmd, env=agent.env, stderr=subprocess.PIPE)
    assert read_until(proc, "started in")[-1].endswith(", agent)")
    agent.kill()
    assert "ffrtmp-ak.scope" in scopes(sandbox)
    wait_for(lambda: try_release(fifo), what="the workload to read its FIFO")
    assert proc.wait(timeout=30) == 7
    assert proc.stderr is not None
    rest = proc.stderr.read().decode().splitlines()
    proc.stderr.close()
    assert [ln for ln in rest if ln.startswith("JOB ak |")] != [] and len(rest) == 2, rest
    lost = "observation of ffrtmp-ak.scope lost, end time is the exit as seen here: agent connection lost at"
    assert lost in rest[0], rest
    res = result_of(state_dir, "ak")
    assert (res["exit_code"], res["governed"]) == (7, True)
    assert res["platform_sla_reason"] == "workload_failed_platform_ok"
    assert res["governance_error"].startswith("observation of ffrtmp-ak.scope lost")
    assert list((state_dir / "results").iterdir()) == [state_dir / "results" / "ak.json"]
    assert not (state_dir / "jobs" / "ak.json").exists()


def test_kill_9_of_the_agent_mid_attach(
    sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    workload = sandbox.spawn(["sh", "-c", f"read x < {fifo}"])
    inner = sandbox.inner_pid(workload)[1]
    cmd = ["ffrtmp", "attach", "--pid", str(inner), "--job-id", "aa", "--json"]
    proc = sandbox.spawn(cmd, env=agent.env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    read_until(proc, "adopted into")
    agent.kill()
    wait_for(lambda: try_release(fifo), what="the workload to read its FIFO")
    assert workload.wait(timeout=30) == 0
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    res = result_of(state_dir, "aa")
    assert res["governed"] is True, (res, err)
    assert res["governance_error"] is not None, (res, err)
    assert res["governance_error"].startswith("observation of ffrtmp-aa.scope lost")
    assert b'"job_id": "aa"' in out and err.decode().count("JOB aa |") == 1


def test_kill_9_of_the_client_the_agent_freezes_once(
    sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path
) -> None:
    fifo, mark = tmp_path / "fifo", tmp_path / "done"
    os.mkfifo(fifo)
    cmd = ["ffrtmp", "run", "--job-id", "ck", "--", "sh", "-c", f"read x < {fifo}; touch {mark}; exit 5"]
    proc = sandbox.spawn(cmd, env=agent.env, stderr=subprocess.PIPE)
    read_until(proc, "started in")
    os.kill(sandbox.inner_pid(proc)[0], signal.SIGKILL)
    proc.wait(timeout=20)
    assert proc.stderr is not None
    proc.stderr.close()
    assert "ffrtmp-ck.scope" in scopes(sandbox)  # the workload goes on in its scope
    wait_for(lambda: try_release(fifo), what="the workload to read its FIFO")
    wait_for((state_dir / "results" / "ck.json").exists, what="the agent's freeze")
    assert mark.exists()
    res = result_of(state_dir, "ck")
    assert res["governed"] is True and res["exit_code"] is None
    assert "client lost" in res["governance_error"]
    # Once: one record and nothing else. The freeze links its temporary file to ck.json, then unlinks it: a
    # listing between the two shows both (seen once in a full run), so wait for the unlink.
    only = [state_dir / "results" / "ck.json"]
    wait_for(lambda: list((state_dir / "results").iterdir()) == only, what="the freeze's temporary file gone")
    assert list((state_dir / "results").iterdir()) == only
    assert agent.proc.poll() is None  # it serves on


def _asleep(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"


def test_waiting_clients_sleep_on_the_socket_and_import_only_the_standard_library(
    sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path
) -> None:
    """A waiting `run` (on its child) and `attach` (on Finish's answer): one thread each, asleep, not woken
    by other jobs' starts and ends; attach's imports are the standard library's too."""
    fifo, fifo2 = tmp_path / "fifo", tmp_path / "fifo2"
    os.mkfifo(fifo)
    os.mkfifo(fifo2)
    env = {**agent.env, "PYTHONPROFILEIMPORTTIME": "1"}
    run = sandbox.spawn(["ffrtmp", "run", "--job-id", "wr", "--", "sh", "-c", f"read x < {fifo}"],
                        env=env, stderr=subprocess.PIPE)  # fmt: skip
    said = {"run": read_until(run, "started in")}
    workload = sandbox.spawn(["sh", "-c", f"read x < {fifo2}"])
    inner = sandbox.inner_pid(workload)[1]
    attach = sandbox.spawn(
        ["ffrtmp", "attach", "--pid", str(inner), "--job-id", "wa"], env=env, stderr=subprocess.PIPE
    )
    said["attach"] = read_until(attach, "adopted into")
    clients = [sandbox.inner_pid(p)[0] for p in (run, attach)]
    wait_for(lambda: all(_asleep(c) for c in clients), what="the clients to wait")
    before = [wakeups(c) for c in clients]
    assert [len(b) for b in before] == [1, 1]  # no thread: the agent governs
    for _ in range(3):
        assert sandbox.run(["ffrtmp", "run", "--", "true"], env=agent.env).returncode == 0
    assert [wakeups(c) for c in clients] == before
    wait_for(lambda: try_release(fifo), what="a workload to read its FIFO")
    wait_for(lambda: try_release(fifo2), what="the other workload to read its FIFO")
    for name, p in (("run", run), ("attach", attach)):
        assert p.wait(timeout=30) == 0
        assert p.stderr is not None
        seen = after_start_up("\n".join(said[name]) + "\n" + p.stderr.read().decode())
        p.stderr.close()
        assert "ffrtmp_systemd.client" in seen and too_heavy(seen) - {"pathlib"} == set(), too_heavy(seen)
    workload.wait(timeout=30)


@pytest.mark.parametrize("mode", ["run", "attach"])
def test_a_stop_signal_detaches_through_the_agent(
    sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path, mode: str
) -> None:
    """SIGTERM to a waiting client: it stops observing (Detach), the agent freezes `detached`, the
    workload and its scope go on; run exits 143, attach 0."""
    fifo, job = tmp_path / "fifo", f"det-{mode}"
    os.mkfifo(fifo)
    waiting = ["sh", "-c", f"read x < {fifo}"]
    workload = None
    if mode == "run":
        cmd = ["ffrtmp", "run", "--job-id", job, "--", *waiting]
    else:
        workload = sandbox.spawn(waiting)
        cmd = ["ffrtmp", "attach", "--pid", str(sandbox.inner_pid(workload)[1]), "--job-id", job]
    proc = sandbox.spawn(cmd, env=agent.env, stderr=subprocess.PIPE)
    read_until(proc, "started in" if mode == "run" else "adopted into")
    os.kill(sandbox.inner_pid(proc)[0], signal.SIGTERM)
    assert proc.wait(timeout=30) == (143 if mode == "run" else 0)
    read_until(proc, f"JOB {job} | ")  # line by line: a detached run's workload holds the pipe too
    assert proc.stderr is not None
    proc.stderr.close()
    res = result_of(state_dir, job)
    assert (res["platform_sla_reason"], res["exit_code"]) == ("detached_workload_continues", None)
    assert sandbox.systemctl("is-active", f"ffrtmp-{job}.scope").stdout.strip() == "active"
    wait_for(lambda: try_release(fifo), what="the workload to read its FIFO")
    if workload is not None:
        assert workload.wait(timeout=30) == 0
