"""The test bed itself: a real systemd boots, makes scopes with limits, and leaves nothing behind."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_sandbox
from helpers import wait_for
from sandbox import REPO, SYSTEMD, Sandbox, _own_cgroups


def test_scope_memory_limit_lands_in_cgroup_files(sandbox: Sandbox) -> None:
    proc = sandbox.spawn(
        ["systemd-run", "--scope", "-q", "--unit=mem-test", "-p", "MemoryMax=100M", "sleep", "5"]
    )
    try:
        limit = sandbox.cgroup_file("memory", "/system.slice/mem-test.scope", "memory.limit_in_bytes")
        wait_for(lambda: limit.exists() and limit.read_text().strip() == str(100 << 20), what="the limit")
        status = sandbox.systemctl("status", "mem-test.scope")
        assert "max: 100.0M" in status.stdout
    finally:
        proc.kill()
        proc.wait()


def test_units_dir_is_on_the_unit_path(sandbox: Sandbox) -> None:
    out = sandbox.systemctl("show", "-p", "LoadState", "ffrtmp.slice")
    assert out.stdout.strip() == "LoadState=loaded"


def test_host_tmp_survives_a_transient_service(sandbox: Sandbox, tmp_path: Path) -> None:
    canary = Path("/tmp") / f"ffrtmp-canary-{sandbox.name}"
    canary.write_text("still here")
    try:
        r = sandbox.run(["systemd-run", "--wait", "-q", "--unit=tmp-victim", "true"])
        assert r.returncode == 0, r.stderr
        assert canary.read_text() == "still here"
    finally:
        canary.unlink()


def test_teardown_leaves_nothing() -> None:
    need_sandbox()
    a, b = Sandbox(), Sandbox()  # two at once must not collide
    try:
        assert a.dir != b.dir and a.name != b.name
        assert a.state() in ("running", "degraded") and b.state() in ("running", "degraded")
        assert a.run(["true"]).returncode == 0
    finally:
        a.close()
        b.close()
    assert a.leftovers() == [] and b.leftovers() == []


def test_command_form_prints_version_and_cleans_up() -> None:
    need_sandbox()
    version = "busctl get-property org.freedesktop.systemd1 /org/freedesktop/systemd1 " \
              "org.freedesktop.systemd1.Manager Version"  # fmt: skip
    script = f'{version} && echo "$DBUS_SYSTEM_BUS_ADDRESS" && exit 7'
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sandbox.py"), "run", "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 7, r.stderr  # the command's own status
    # the booted systemd is the installed one: `systemd 252 (252.38-1~deb12u1)` -> s "252.38-1~deb12u1"
    installed = subprocess.run([str(SYSTEMD), "--version"], capture_output=True, text=True).stdout
    printed, address = r.stdout.splitlines()
    assert printed == f's "{installed.split("(", 1)[1].split(")", 1)[0]}"'
    # unix:path=/var/tmp/ffrtmp-sb-NAME.XXXX/run/dbus/...: its directory and cgroups are gone
    top = Path(address.removeprefix("unix:path=")).parents[2]
    name = top.name.split(".")[0]
    assert top.parent == Path("/var/tmp") and name.startswith("ffrtmp-sb-")
    assert not top.exists() and [p for p in _own_cgroups().values() if list(p.glob(f"{name}*"))] == []


# -- issue 10: stopped by a signal (as `timeout` stops it), the sandbox leaves nothing behind either --
INNER = """
import json, time
from conftest import sandbox  # the shared fixture itself

def test_wait(sandbox):
    print("SANDBOX", json.dumps([sandbox.name, str(sandbox.dir)]), flush=True)
    time.sleep(120)
"""


def traces(name: str, d: Path) -> list[str]:
    """What of the sandbox `name` (directory `d`) is left on the host: processes, cgroups, mounts, files."""
    ghost = Sandbox.__new__(Sandbox)  # Sandbox.leftovers() of one this process did not make
    ghost.name, ghost.dir, ghost.pid = name, d, 0
    ghost.cgroups = {c: p / name for c, p in _own_cgroups().items()}
    ghost.clients = {c: p.with_name(f"{name}-clients") for c, p in ghost.cgroups.items() if c == "cpu"}
    return ghost.leftovers() + [f"process {p}" for p in in_cgroup(name)]


def in_cgroup(name: str, argv: bytes | None = None) -> list[str]:
    """PIDs of host processes in a cgroup whose path names `name` (with this command line, if given)."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            here = p.name.isdigit() and name in (p / "cgroup").read_text()
            if here and (argv is None or (p / "cmdline").read_bytes() == argv):
                out.append(p.name)
        except OSError:
            continue
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_command_form_stopped_by_a_signal_leaves_nothing(sig: signal.Signals) -> None:
    need_sandbox()
    script = 'echo "$DBUS_SYSTEM_BUS_ADDRESS"; exec sleep 60'  # unix:path=/var/tmp/NAME.XXXX/run/dbus/...
    cmd = [sys.executable, str(REPO / "tests" / "sandbox.py"), "run", "--", "sh", "-c", script]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        d = Path(proc.stdout.readline().strip().removeprefix("unix:path=")).parents[2]
        name = d.name.split(".")[0]
        assert name.startswith("ffrtmp-sb-"), d
        wait_for(lambda: in_cgroup(name, b"sleep\x0060\x00"), timeout=60, what="sleep 60 inside")
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == -sig
    finally:
        proc.kill()
        proc.wait()
    assert traces(name, d) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_pytest_stopped_by_a_signal_tears_its_fixtures_down(tmp_path: Path, sig: signal.Signals) -> None:
    need_sandbox()
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "test_inner.py"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = next((ln for ln in proc.stdout if ln.startswith("SANDBOX ")), "")
        name, d = json.loads(line.removeprefix("SANDBOX "))
        assert traces(name, Path(d)) != []  # it is there while the test runs
        proc.send_signal(sig)
        interrupted = 2  # pytest's own status after KeyboardInterrupt, which unwinds the fixtures
        assert proc.wait(timeout=60) == (interrupted if sig == signal.SIGINT else -sig)
    finally:
        proc.kill()
        proc.wait()
    assert traces(name, Path(d)) == []


def test_command_form_with_agent_starts_the_agents_socket() -> None:
    """`--agent`: ffrtmp.socket listens before CMD runs (the installed mode); without it, nothing does.
    Either way the agent's unit runs the repo's venv, with the sandbox's own state directory."""
    need_sandbox()
    script = "systemctl is-active ffrtmp.socket; test -S /run/ffrtmp/agent.sock && echo socket; " \
             "systemctl show -p ExecStart --value ffrtmp-agent.service"  # fmt: skip
    out = {}
    for args in (["--agent"], []):
        r = subprocess.run(
            [sys.executable, str(REPO / "tests" / "sandbox.py"), "run", *args, "--", "sh", "-c", script],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        out[bool(args)] = r.stdout.splitlines()
    assert out[True][:2] == ["active", "socket"] and out[False][0] == "inactive"
    for lines in out.values():
        assert (
            f"path={REPO}/.venv/bin/ffrtmp ; argv[]={REPO}/.venv/bin/ffrtmp agent --state-dir /var/tmp/"
            in lines[-1]
        )
