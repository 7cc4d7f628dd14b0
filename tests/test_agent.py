"""The node agent (`ffrtmp agent --socket PATH`), driven by a small root client inside the sandbox that
speaks varlink.py's protocol, as the thin client does: peer credentials, Run/Finish with the limits in
the scope's cgroup files, a client gone before Finish, kill -9 of the agent and its resume, and 300
jobs through one agent while `busctl` keeps answering. The in-process host (agent.inprocess()) runs the
same handler: the happy path is run through it too."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import release, result_of, scopes
from helpers import free_port, get, read_until, samples, value, wait_for
from sandbox import Sandbox

# Each test starts the agent it talks to (--socket): the same in either test mode, run once.
pytestmark = pytest.mark.mode("in-process")

# The client: fork a child that waits for its go, Run it, let it go, wait for it, Finish. One JSON line
# per reply on stdout. argv: how (agent SOCKET | inprocess) JOB STATE_DIR [finish|drop] -- CMD...
CLIENT = r"""
import json, os, socket, sys
from ffrtmp_systemd import varlink
how, where, job, state, end = sys.argv[1:6]
cmd = sys.argv[7:]
if how == "inprocess":
    from ffrtmp_systemd import agent
    sock = agent.inprocess()
else:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(where)
c = varlink.Connection(sock)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(r, 1)
    os.execvp(cmd[0], cmd)
limits = {"memory_max": 64 << 20, "cpu_quota_per_sec_usec": 500000}
c.send(varlink.call("Run", job_id=job, pid=pid, limits=limits, intent=None, command=cmd, state_dir=state))
print(json.dumps(c.receive()), flush=True)
os.write(w, b"g")
if end == "drop":
    os._exit(0)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
code, sig = (status, None) if status >= 0 else (None, -status)
c.send(varlink.call("Finish", job_id=job, exit_code=code, signal=sig, exec_errno=None))
print(json.dumps(c.receive()), flush=True)
"""

# Many jobs at once: N children that wait on one pipe (stdin), N connections, N Runs sent before any
# reply is read; a line on stdin lets them all end; then N Finishes. argv: SOCKET STATE_DIR N
MANY = r"""
import json, os, resource, socket, sys
from ffrtmp_systemd import varlink
where, state, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
r, w = os.pipe()
kids, conns = [], []
for i in range(n):
    pid = os.fork()
    if pid == 0:
        os.dup2(r, 0)
        os.execvp("sh", ["sh", "-c", "read x"])
    kids.append(pid)
for i, pid in enumerate(kids):
    s = socket.socket(socket.AF_UNIX)
    s.connect(where)
    c = varlink.Connection(s)
    c.send(varlink.call("Run", job_id=f"m{i}", pid=pid, limits={"memory_max": 64 << 20}, intent=None,
                        command=["sh", "-c", "read x"], state_dir=state))
    conns.append(c)
replies = [c.receive() for c in conns]
print(json.dumps({"governed": sum(bool(x.get("parameters", {}).get("governed")) for x in replies),
                  "errors": [x for x in replies if "error" in x][:3]}), flush=True)
sys.stdin.readline()
os.close(w)
for i, (pid, c) in enumerate(zip(kids, conns)):
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    c.send(varlink.call("Finish", job_id=f"m{i}", exit_code=code, signal=None, exec_errno=None))
results = [c.receive() for c in conns]
print(json.dumps({"frozen": sum(bool(x.get("parameters", {}).get("result")) for x in results)}), flush=True)
"""


class Agent:
    def __init__(self, sandbox: Sandbox, sock: Path, state_dir: Path) -> None:
        self.sandbox, self.sock, self.state_dir = sandbox, sock, state_dir
        self.proc = sandbox.spawn(
            ["ffrtmp", "agent", "--listen", "none", "--socket", str(sock), "--state-dir", str(state_dir)],
            stderr=subprocess.PIPE,
        )
        self.ready = read_until(self.proc, "agent ready")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.sandbox.inner_pid(self.proc)[0], signal.SIGKILL)
            self.proc.wait(timeout=20)


@pytest.fixture
def agent(sandbox: Sandbox, state_dir: Path, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(sandbox, tmp_path / "agent.sock", state_dir)
    yield a
    a.kill()


def client(
    sandbox: Sandbox,
    how: str,
    where: Path | str,
    job: str,
    state_dir: Path,
    *cmd: str,
    end: str = "finish",
    user: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    argv = [*(user or []), "python3", "-c", CLIENT, how, str(where), job, str(state_dir), end, "--", *cmd]
    return sandbox.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def reply(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the client ended: {proc.stderr.read().decode() if proc.stderr else ''}"
    return dict(json.loads(line))


def test_a_non_root_peer_may_not_run(sandbox: Sandbox, state_dir: Path) -> None:
    open_dir = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="ffrtmp-agent-"))  # pytest's are root's only
    open_dir.chmod(0o755)
    a = Agent(sandbox, open_dir / "agent.sock", state_dir)
    try:
        os.chmod(a.sock, 0o666)  # as a socket unit may make it: the agent itself must refuse
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = client(sandbox, "agent", a.sock, "nope", state_dir, "true", user=nobody)
        r = reply(proc)
        assert r["error"] == "io.ffrtmp.Agent.PermissionDenied", r
        assert "only root" in r["parameters"]["message"]
        proc.kill()
        proc.wait(timeout=20)
        assert not (state_dir / "jobs" / "nope.json").exists() and "ffrtmp-nope" not in scopes(sandbox)
    finally:
        a.kill()
        shutil.rmtree(open_dir)


def test_run_pid_must_be_the_callers_child(sandbox: Sandbox, agent: Agent, state_dir: Path) -> None:
    code = (
        "import json,socket,sys; from ffrtmp_systemd import varlink; s=socket.socket(socket.AF_UNIX);"
        f"s.connect({str(agent.sock)!r}); c=varlink.Connection(s);"
        "c.send(varlink.call('Run', job_id='x', pid=1, limits={}, intent=None, command=['true'],"
        f" state_dir={str(state_dir)!r})); print(json.dumps(c.receive()))"
    )
    r = json.loads(sandbox.run(["python3", "-c", code], check=True).stdout)
    assert r["error"] == "io.ffrtmp.Agent.PermissionDenied" and "not a child" in r["parameters"]["message"]


@pytest.mark.parametrize("how", ["agent", "inprocess"])
def test_run_and_finish(sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path, how: str) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    job = f"ok-{how}"
    proc = client(sandbox, how, agent.sock, job, state_dir, "sh", "-c", f"read x < {fifo}; exit 3")
    r = reply(proc)["parameters"]
    assert r == {"unit": f"ffrtmp-{job}.scope", "governed": True, "error": None, "lines": []}
    cg = f"/ffrtmp.slice/ffrtmp-{job}.scope"
    assert sandbox.cgroup_file("memory", cg, "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
    assert sandbox.cgroup_file("cpu", cg, "cpu.cfs_quota_us").read_text().strip() == "50000"
    contract = json.loads((state_dir / "jobs" / f"{job}.json").read_text())
    assert contract["wrapper_pid"] != 0 and contract["governed"] is True
    wait_for(lambda: _try(release, fifo), what="the workload to read its FIFO")
    result = reply(proc)["parameters"]["result"]
    assert proc.wait(timeout=20) == 0
    assert result == result_of(state_dir, job)
    assert result["exit_code"] == 3 and result["governed"] and result["governance_error"] is None
    assert result["platform_sla_reason"] == "workload_failed_platform_ok"
    assert not (state_dir / "jobs" / f"{job}.json").exists()


def _try(f: Any, *a: Any) -> bool:
    try:
        f(*a)
    except OSError:
        return False
    return True


def test_a_client_gone_before_finish_is_frozen_once_by_the_agent(
    sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    proc = client(sandbox, "agent", agent.sock, "gone", state_dir, "sh", "-c", f"read x < {fifo}", end="drop")
    assert reply(proc)["parameters"]["governed"] is True
    assert proc.wait(timeout=20) == 0  # the client is gone; its child runs on, in its scope
    assert "ffrtmp-gone.scope" in scopes(sandbox)
    assert not (state_dir / "results" / "gone.json").exists()
    wait_for(lambda: _try(release, fifo), what="the workload to read its FIFO")
    frozen = (state_dir / "results" / "gone.json", state_dir / "jobs" / "gone.json")
    wait_for(lambda: frozen[0].exists() and not frozen[1].exists(), what="the agent's freeze")
    res = result_of(state_dir, "gone")
    assert res["exit_code"] is None and res["governed"] is True
    assert "client lost" in res["governance_error"] and "exit status unknown" in res["governance_error"]
    assert os.listdir(state_dir / "results") == ["gone.json"] and os.listdir(state_dir / "jobs") == []
    assert agent.proc.poll() is None


def test_kill_9_of_the_agent_then_its_restart_resumes_the_orphaned_job(
    sandbox: Sandbox, state_dir: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    first = Agent(sandbox, tmp_path / "a.sock", state_dir)
    proc = client(sandbox, "agent", first.sock, "res", state_dir, "sh", "-c", f"read x < {fifo}")
    try:
        assert reply(proc)["parameters"]["governed"] is True
        first.kill()
        assert sandbox.systemctl("is-active", "ffrtmp-res.scope").stdout.strip() == "active"
        os.kill(sandbox.inner_pid(proc)[0], signal.SIGKILL)  # and its client: no one observes the job
        proc.wait(timeout=20)
        assert sandbox.systemctl("is-active", "ffrtmp-res.scope").stdout.strip() == "active"
        second = Agent(sandbox, tmp_path / "a.sock", state_dir)
        assert any("1 jobs resumed" in line for line in second.ready), second.ready
        assert not (state_dir / "results" / "res.json").exists()
        wait_for(lambda: _try(release, fifo), what="the workload to read its FIFO")
        frozen = (state_dir / "results" / "res.json", state_dir / "jobs" / "res.json")
        wait_for(lambda: frozen[0].exists() and not frozen[1].exists(), what="the resumed job's freeze")
        res = result_of(state_dir, "res")
        assert res["governed"] and res["exit_code"] is None and "resumed" in res["governance_error"]
        assert res["platform_sla_reason"] == "completed_within_limits"
        assert os.listdir(state_dir / "jobs") == []
        second.kill()
    finally:
        proc.kill()
        first.kill()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", [300, 1000])
def test_many_jobs_through_one_agent_all_governed_and_the_bus_answers(
    sandbox: Sandbox, agent: Agent, state_dir: Path, n: int
) -> None:
    """Over dbus-daemon's 256 connections a user and 512 match rules a connection (systemd's own too)."""
    proc = sandbox.spawn(
        ["python3", "-c", MANY, str(agent.sock), str(state_dir), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        started = reply(proc)
        assert started == {"governed": n, "errors": []}
        listing = sandbox.run(["busctl", "--system", "--no-pager", "list"], timeout=30)
        assert listing.returncode == 0 and "org.freedesktop.systemd1" in listing.stdout, listing.stderr
        assert (
            len([ln for ln in scopes(sandbox).splitlines() if ln.startswith("ffrtmp-m") and " active " in ln])
            == n
        )
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert reply(proc) == {"frozen": n}
        assert proc.wait(timeout=60) == 0
        assert len(os.listdir(state_dir / "results")) == n and os.listdir(state_dir / "jobs") == []
    finally:
        proc.kill()


# Attach then Finish at once (the agent answers it once it has seen the end). argv: SOCKET JOB STATE PID
ATTACH = r"""
import json, socket, sys
from ffrtmp_systemd import varlink
where, job, state, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_UNIX)
s.connect(where)
c = varlink.Connection(s)
c.send(varlink.call("Attach", job_id=job, pid=pid, limits={"memory_max": 64 << 20}, intent=None, force=False,
                    state_dir=state))
r = c.receive()
print(json.dumps(r), flush=True)
if "error" not in r:
    c.send(varlink.call("Finish", job_id=job, exit_code=None, signal=None, exec_errno=None))
    print(json.dumps(c.receive()), flush=True)
"""


def test_attach_through_the_agent_and_a_second_attach_refused(
    sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    work = sandbox.spawn(["sh", "-c", f"read x < {fifo}"])
    pid = sandbox.inner_pid(work)[1]
    argv = ["python3", "-c", ATTACH, str(agent.sock)]
    first = sandbox.spawn(
        [*argv, "a1", str(state_dir), str(pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        r = reply(first)["parameters"]
        assert r == {
            "unit": "ffrtmp-a1.scope",
            "lines": [[6, f"ffrtmp: job a1: PID {pid} adopted into ffrtmp-a1.scope"]],
        }
        cg = "/ffrtmp.slice/ffrtmp-a1.scope"
        assert sandbox.cgroup_file("memory", cg, "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        second = sandbox.run([*argv, "a2", str(state_dir), str(pid)], check=True)
        refused = json.loads(second.stdout)
        assert refused["error"] == "io.ffrtmp.Agent.Refused"
        assert (
            refused["parameters"]["message"] == f"PID {pid} is already governed by job 'a1' (ffrtmp-a1.scope)"
        )
        assert refused["parameters"]["status"] == 1 and not (state_dir / "jobs" / "a2.json").exists()
        wait_for(lambda: _try(release, fifo), what="the workload to read its FIFO")
        result = reply(first)["parameters"]["result"]
        assert result == result_of(state_dir, "a1") and result["mode"] == "attach"
        assert result["exit_code"] is None and result["platform_sla_reason"] == "completed_within_limits"
        assert first.wait(timeout=20) == 0
    finally:
        first.kill()
        work.kill()


def test_socket_activation(sandbox: Sandbox, state_dir: Path, tmp_path: Path) -> None:
    """As ffrtmp.socket starts it: the listening socket is passed (LISTEN_FDS), the first client served."""
    sock = tmp_path / "act.sock"
    act = sandbox.spawn(
        [
            "systemd-socket-activate",
            "-l",
            str(sock),
            "-E",
            "DBUS_SYSTEM_BUS_ADDRESS",
            "ffrtmp",
            "agent",
            "--listen",
            "none",
            "--state-dir",
            str(state_dir),
        ],
        stderr=subprocess.PIPE,
    )
    inner = sandbox.inner_pid(act)[0]  # exec'd into the agent at the first connection
    try:
        read_until(act, "Listening on")
        proc = client(sandbox, "agent", sock, "act", state_dir, "sh", "-c", "exit 0")
        assert reply(proc)["parameters"]["governed"] is True
        assert reply(proc)["parameters"]["result"]["platform_sla_reason"] == "completed_within_limits"
        assert proc.wait(timeout=20) == 0
    finally:
        os.kill(inner, signal.SIGKILL)
        act.wait(timeout=20)


def test_on_bus_loss_new_calls_are_refused_its_job_is_frozen_then_the_agent_exits(
    fresh_sandbox: Sandbox, tmp_path: Path
) -> None:
    sb, state_dir = fresh_sandbox, tmp_path / "state"
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    a = Agent(sb, tmp_path / "a.sock", state_dir)
    proc = client(sb, "agent", a.sock, "lost", state_dir, "sh", "-c", f"read x < {fifo}; exit 5")
    assert reply(proc)["parameters"]["governed"] is True
    daemon = sb.run(["pidof", "dbus-daemon"], check=True).stdout.split()
    assert len(daemon) == 1
    sb.run(["kill", "-9", daemon[0]], check=True)
    late = client(sb, "agent", a.sock, "late", state_dir, "true")
    r = reply(late)
    assert r["error"] == "io.ffrtmp.Agent.Unavailable", r
    late.wait(timeout=20)
    assert a.proc.poll() is None  # it still observes its job
    wait_for(lambda: _try(release, fifo), what="the workload to read its FIFO")
    result = reply(proc)["parameters"]["result"]
    assert result["exit_code"] == 5 and result["governed"] and "lost" in result["governance_error"]
    assert result == result_of(state_dir, "lost")
    assert a.proc.wait(timeout=30) == 0  # no job left: it exits (socket activation starts a fresh one)


def test_a_second_agent_does_not_take_a_live_agents_socket(
    sandbox: Sandbox, agent: Agent, state_dir: Path
) -> None:
    r = sandbox.run(
        ["ffrtmp", "agent", "--listen", "none", "--socket", str(agent.sock), "--state-dir", str(state_dir)],
        timeout=30,
    )
    assert (r.returncode, r.stderr) == (1, f"ffrtmp: an agent already listens on {agent.sock}\n")
    assert agent.proc.poll() is None and agent.sock.is_socket()


def test_bad_parameters_are_one_clear_error(sandbox: Sandbox, agent: Agent, state_dir: Path) -> None:
    code = (
        "import json,os,socket,sys; from ffrtmp_systemd import varlink; s=socket.socket(socket.AF_UNIX);"
        f"s.connect({str(agent.sock)!r}); c=varlink.Connection(s); pid=os.fork()\n"
        "if pid == 0: os.execvp('sleep', ['sleep', '5'])\n"
        "for job, sd in (('../x', sys.argv[1]), ('ok', 'relative')):\n"
        "    p = dict(job_id=job, pid=pid, limits={}, intent=None, command=['sleep'], state_dir=sd)\n"
        "    c.send(varlink.call('Run', **p))\n"
        "    print(json.dumps(c.receive()))\n"
        "os.kill(pid, 9)"
    )
    out = sandbox.run(["python3", "-c", code, str(state_dir)], check=True).stdout.splitlines()
    bad_id, relative = (json.loads(line) for line in out)
    assert bad_id["error"] == "io.ffrtmp.Agent.JobRefused"
    assert bad_id["parameters"]["message"].startswith("invalid job id '../x': use 1-100 of")
    assert relative["error"] == "io.ffrtmp.Agent.JobRefused"
    assert relative["parameters"]["message"] == "state_dir must be an absolute path, not 'relative'"
    assert not (state_dir / "jobs").exists() or os.listdir(state_dir / "jobs") == []


def test_in_process_without_a_bus_the_contract_comes_first_and_the_job_runs_ungoverned(
    sandbox: Sandbox, state_dir: Path, tmp_path: Path
) -> None:
    """The in-process host connects its bus after the contract is written, as a wrapper always did."""
    argv = [
        "python3",
        "-c",
        CLIENT,
        "inprocess",
        "-",
        "nobus",
        str(state_dir),
        "finish",
        "--",
        "sh",
        "-c",
        "exit 0",
    ]
    env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/none"}
    proc = sandbox.spawn(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r = reply(proc)["parameters"]
    assert r["governed"] is False and "cannot reach the system bus" in r["error"]
    result = reply(proc)["parameters"]["result"]
    assert proc.wait(timeout=20) == 0
    assert (
        result == result_of(state_dir, "nobus") and result["platform_sla_reason"] == "governance_unavailable"
    )


def test_detach_freezes_detached_and_the_workload_runs_on(
    sandbox: Sandbox, agent: Agent, state_dir: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    code = (
        "import json,os,socket,sys; from ffrtmp_systemd import varlink; s=socket.socket(socket.AF_UNIX);"
        "s.connect(sys.argv[1]); c=varlink.Connection(s); pid=os.fork()\n"
        "if pid == 0: os.execvp('sh', ['sh', '-c', 'read x < ' + sys.argv[3]])\n"
        "p = dict(job_id='det', pid=pid, limits={}, intent=None, command=['sh'], state_dir=sys.argv[2])\n"
        "c.send(varlink.call('Run', **p)); print(json.dumps(c.receive()), flush=True)\n"
        "c.send(varlink.call('Finish', job_id='det', exit_code=None, signal=None, exec_errno=None))\n"
        "c.send(varlink.call('Detach', oneway=True, job_id='det', signal=15))\n"
        "print(json.dumps(c.receive()), flush=True)"
    )
    proc = sandbox.spawn(
        ["python3", "-c", code, str(agent.sock), str(state_dir), str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert reply(proc)["parameters"]["governed"] is True
    result = reply(proc)["parameters"]["result"]
    assert proc.wait(timeout=20) == 0
    assert result["platform_sla_reason"] == "detached_workload_continues" and result == result_of(
        state_dir, "det"
    )
    assert sandbox.systemctl("is-active", "ffrtmp-det.scope").stdout.strip() == "active"  # runs on, governed
    wait_for(lambda: _try(release, fifo), what="the workload to read its FIFO")


def test_ready_is_notified_to_systemd(sandbox: Sandbox, state_dir: Path, tmp_path: Path) -> None:
    """Type=notify: systemd-run returns once the start job is done, which READY=1 ends."""
    ffrtmp = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "ffrtmp")
    argv = [
        ffrtmp,
        "agent",
        "--listen",
        "none",
        "--socket",
        str(tmp_path / "n.sock"),
        "--state-dir",
        str(state_dir),
    ]
    try:
        r = sandbox.run(
            ["systemd-run", "--unit=agent-notify", "-p", "Type=notify", "-p", "TimeoutStartSec=20", *argv],
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert sandbox.systemctl("is-active", "agent-notify.service").stdout.strip() == "active"
    finally:
        sandbox.systemctl("stop", "agent-notify.service")


def _agent_with_metrics(sandbox: Sandbox, sock: Path, state_dir: Path, listen: str) -> tuple[Any, list[str]]:
    proc = sandbox.spawn(
        ["ffrtmp", "agent", "--listen", listen, "--socket", str(sock), "--state-dir", str(state_dir)],
        stderr=subprocess.PIPE,
    )
    return proc, read_until(proc, "agent ready")


def test_the_agent_serves_the_exporters_endpoints(sandbox: Sandbox, state_dir: Path, tmp_path: Path) -> None:
    """One process per node: the counters of the jobs it froze, and /healthz, from the agent itself."""
    port = free_port()
    proc, _ = _agent_with_metrics(sandbox, tmp_path / "m.sock", state_dir, f"127.0.0.1:{port}")
    try:
        env = {"FFRTMP_AGENT_SOCKET": str(tmp_path / "m.sock"), "FFRTMP_STATE_DIR": str(state_dir)}
        r = sandbox.run(["ffrtmp", "run", "--job-id", "m1", "--", "sh", "-c", "exit 3"], env=env)
        assert r.returncode == 3 and "(pid" in r.stderr and ", agent)" in r.stderr, r.stderr
        status, _, body = get(f"http://127.0.0.1:{port}/metrics")
        s = samples(body)
        assert status == 200
        assert value(s, "ffrtmp_jobs_total", state="completed") == 1
        assert value(s, "ffrtmp_jobs_by_exit_total", exit="non_zero") == 1
        assert get(f"http://127.0.0.1:{port}/healthz")[:1] == (200,)
    finally:
        proc.kill()
        proc.wait(timeout=20)


def test_an_agent_whose_metrics_port_is_taken_still_governs(
    sandbox: Sandbox, state_dir: Path, tmp_path: Path
) -> None:
    """Governance does not depend on the metrics: one line says they are not served, jobs go on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, lines = _agent_with_metrics(sandbox, tmp_path / "t.sock", state_dir, f"127.0.0.1:{port}")
        try:
            said = f"ffrtmp: agent: not serving metrics on 127.0.0.1:{port}: "
            assert [ln.startswith(said) for ln in lines].count(True) == 1, lines
            env = {"FFRTMP_AGENT_SOCKET": str(tmp_path / "t.sock"), "FFRTMP_STATE_DIR": str(state_dir)}
            r = sandbox.run(["ffrtmp", "run", "--job-id", "t1", "--", "true"], env=env)
            assert r.returncode == 0 and ", agent)" in r.stderr, r.stderr
            assert result_of(state_dir, "t1")["governed"] is True
        finally:
            proc.kill()
            proc.wait(timeout=20)


def test_an_agent_that_cannot_watch_says_so_once_and_governs(
    sandbox: Sandbox, state_dir: Path, tmp_path: Path
) -> None:
    """Watch rules in the agent need the kernel's process events, which a PID namespace (this sandbox, a
    container) does not give: one line, and the clients' jobs are governed all the same."""
    rules = tmp_path / "watch.toml"
    rules.write_text('[[rule]]\nname = "r"\nexe = "sleep"\n')
    rules.chmod(0o644)
    sock = tmp_path / "w.sock"
    proc = sandbox.spawn(
        ["ffrtmp", "agent", "--listen", "none", "--watch", str(rules), "--socket", str(sock),
         "--state-dir", str(state_dir)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        lines = read_until(proc, "agent ready")
        assert lines[:-1] == [
            "ffrtmp: agent: not watching: process events unavailable: this process is not in the host's "
            "initial PID and user namespaces (a container or a sandbox)"
        ], lines
        env = {"FFRTMP_AGENT_SOCKET": str(sock), "FFRTMP_STATE_DIR": str(state_dir)}
        r = sandbox.run(["ffrtmp", "run", "--job-id", "w1", "--", "true"], env=env)
        assert r.returncode == 0 and ", agent)" in r.stderr, r.stderr
        assert result_of(state_dir, "w1")["governed"] is True
    finally:
        proc.kill()
        proc.wait(timeout=20)


# What no client of ours sends: each on its own connection, then a good call on another. argv: SOCKET
BAD_FRAMES = r"""
import json, socket, sys
from ffrtmp_systemd import varlink
frames = [b'\xff\xfe{"method": "x"}\0', b"not json\0", b"[1]\0", b"[" * 200000 + b"\0", b"x" * (3 << 20)]
for frame in frames:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    try:
        s.sendall(frame)
    except OSError:  # the agent closed the connection before it read all of it
        pass
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    print(json.dumps(got.decode()), flush=True)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
c = varlink.Connection(s)
c.send(varlink.call("Finish", job_id="none", exit_code=0, signal=None, exec_errno=None))
print(json.dumps(c.receive()), flush=True)
"""


def test_a_broken_message_is_one_error_and_the_agent_serves_on(sandbox: Sandbox, agent: Agent) -> None:
    out = sandbox.run(["python3", "-c", BAD_FRAMES, str(agent.sock)], check=True).stdout.splitlines()
    *bad, good = (json.loads(line) for line in out)
    assert len(bad) == 5
    for text in bad:  # one error reply, then the connection closed
        assert text.count("\0") == 1 and text.endswith("\0"), text
        error = json.loads(text[:-1])
        assert error["error"] == "io.ffrtmp.Agent.InvalidParameter", error
        assert error["parameters"]["message"].startswith("not a varlink message: "), error
    assert "longer than" in json.loads(bad[-1][:-1])["parameters"]["message"]
    assert good["error"] == "io.ffrtmp.Agent.NoSuchJob"  # served on
    assert agent.proc.poll() is None
    agent.kill()
    assert agent.proc.stderr is not None
    said = agent.proc.stderr.read().decode().splitlines()
    lines = [ln for ln in said if "not a varlink message" in ln]
    assert len(lines) == 5 and not [ln for ln in said if "Traceback" in ln], said
