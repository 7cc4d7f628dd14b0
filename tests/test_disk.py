"""Disk trouble in the state directory: read-only, missing, full; before the job and while it runs.

Every mount is made inside the module sandbox's private mount namespace (the host sees an empty
directory), so files under it are read from inside too.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import read_until, release, scopes, wait_for
from helpers import assert_clean_stderr, untrust
from sandbox import Sandbox

RO, FULL = "Read-only file system", "No space left on device"
TROUBLES = {"ro-tmpfs": RO, "ro-bind": RO, "missing": RO, "full": FULL}
LIST = """
import os, sys
for d, _, names in os.walk(sys.argv[1]):
    for n in names:
        p = os.path.join(d, n)
        if os.path.isfile(p):  # not the FIFO
            text = "" if n == "filler" else open(p).read()
            print(os.path.relpath(p, sys.argv[1]), text, sep="\\0", end="\\0")
"""
Mount = Callable[..., None]


@pytest.fixture
def mount(sandbox: Sandbox) -> Iterator[Mount]:
    """mount(ARGS..., target=PATH) inside the sandbox's mount namespace; undone after the test."""
    targets: list[Path] = []

    def do(*args: str, target: Path) -> None:
        target.mkdir(exist_ok=True)
        r = sandbox.run(["mount", *args, str(target)])
        assert r.returncode == 0, r.stderr
        targets.append(target)
        # A mount's own flags (a read-only remount) do not propagate into the agent's mount namespace
        # (a slave, for ProtectSystem=): an operator remounts there too, as README's agent section says.
        if sandbox.agent and "remount" in " ".join(args):
            pid = sandbox.systemctl("show", "-p", "MainPID", "--value", "ffrtmp-agent.service").stdout.strip()
            r = sandbox.run(["nsenter", "-t", pid, "-m", "mount", *args, str(target)])
            assert r.returncode == 0, r.stderr

    yield do
    for target in reversed(targets):
        sandbox.run(["umount", str(target)])  # a remount shares its target's mount: errors are fine


def files(sandbox: Sandbox, d: Path) -> dict[str, str]:
    """Every file under `d` as the sandbox sees it (dot files too), with its text ("" for the filler)."""
    out = sandbox.run(["python3", "-c", LIST, str(d)], check=True).stdout.split("\0")[:-1]
    return dict(zip(out[::2], out[1::2], strict=True))


def fill(sandbox: Sandbox, d: Path) -> None:
    sandbox.run(["dd", "if=/dev/zero", f"of={d}/filler", "bs=4k"])  # fails at ENOSPC, as meant
    assert sandbox.run(["sh", "-c", f"echo x > {d}/probe"]).returncode != 0, "the tmpfs is not full"
    sandbox.run(["rm", f"{d}/probe"], check=True)  # the empty file a naive writer would leave behind


def trouble(sandbox: Sandbox, mount: Mount, tmp_path: Path, kind: str) -> Path:
    """A state directory with this kind of trouble; returns its path."""
    state = tmp_path / "state"
    if kind == "ro-tmpfs":
        mount("-t", "tmpfs", "-o", "ro,size=64k,mode=0755", "tmpfs", target=state)
    elif kind == "ro-bind":  # an earlier result stays readable, nothing new can be written
        (state / "results").mkdir(parents=True)
        (state / "results" / "old.json").write_text("{}\n")
        mount("--bind", str(state), target=state)
        mount("-o", "remount,bind,ro", target=state)
    elif kind == "missing":  # cannot be created: its parent is on a read-only mount
        mount("-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", target=tmp_path / "ro")
        state = tmp_path / "ro" / "missing" / "state"
    else:
        mount("-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", target=state)
        fill(sandbox, state)
    return state


Troubled = tuple[Path, str, dict[str, str]]


def run_governed_exit_7(sandbox: Sandbox, tmp_path: Path, state: Path, *limits: str) -> list[str]:
    """`ffrtmp run` of a workload that exits 7 with this state directory: it ran governed and its status
    came back whatever the directory did; the wrapper's stderr lines, each one clean."""
    evidence = tmp_path / "cgroup"
    r = sandbox.run(
        ["ffrtmp", "run", "--job-id", "j", *limits, "--state-dir", str(state), "--",
         "sh", "-c", f"cat /proc/self/cgroup > {evidence}; exit 7"]
    )  # fmt: skip
    assert r.returncode == 7, r.stderr  # the workload's own status
    assert "ffrtmp.slice/ffrtmp-j.scope" in evidence.read_text()  # it ran, governed
    lines = r.stderr.splitlines()
    assert_clean_stderr(lines)
    return lines


@pytest.fixture(params=TROUBLES)
def troubled(sandbox: Sandbox, mount: Mount, tmp_path: Path, request: pytest.FixtureRequest) -> Troubled:
    """A state directory with each kind of trouble in turn: (it, the kind, the files under tmp_path)."""
    return trouble(sandbox, mount, tmp_path, request.param), request.param, files(sandbox, tmp_path)


def test_run_still_runs_governed_and_propagates(sandbox: Sandbox, tmp_path: Path, troubled: Troubled) -> None:
    state, kind, before = troubled
    lines = run_governed_exit_7(sandbox, tmp_path, state, "--memory-max", "64M")
    why = TROUBLES[kind]
    assert [ln for ln in lines if why in ln] == [
        f"ffrtmp: job j: contract not saved, the workload runs all the same: "
        f"cannot write {state}/jobs/j.json: {why}",
        f"ffrtmp: job j: result not saved: cannot write {state}/results/j.json: {why}",
    ]
    assert lines[-1].startswith(
        "JOB j | mode=run | intent=- | sla=COMPLIANT | reason=workload_failed_platform_ok"
    )
    after = files(sandbox, tmp_path)
    assert after.pop("cgroup") and after == before  # nothing written, nothing partial, nothing lost
    wait_for(lambda: "ffrtmp-j" not in scopes(sandbox), what="the scope to go")


def test_attach_refuses_and_leaves_the_process_alone(
    sandbox: Sandbox, tmp_path: Path, troubled: Troubled
) -> None:
    state, kind, before = troubled
    fifo = tmp_path / "fifo"
    subprocess.run(["mkfifo", str(fifo)], check=True)
    workload = sandbox.spawn(["sh", "-c", f"read line < {fifo}; exit 7"])
    try:
        host, pid = sandbox.inner_pid(workload)
        cgroup = Path(f"/proc/{host}/cgroup").read_text()
        r = sandbox.run(["ffrtmp", "attach", "--pid", str(pid), "--job-id", "a", "--state-dir", str(state)])
        assert r.returncode == 1
        assert r.stderr.splitlines() == [f"ffrtmp: cannot write {state}/jobs/a.json: {TROUBLES[kind]}"]
        assert workload.poll() is None and Path(f"/proc/{host}/cgroup").read_text() == cgroup  # untouched
        assert "ffrtmp-a." not in scopes(sandbox)
        assert files(sandbox, tmp_path) == before
        release(fifo)
        assert workload.wait(timeout=30) == 7
    finally:
        workload.kill()
        workload.wait()


@pytest.mark.parametrize("mode", ["run", "attach"])
@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_trouble_mid_job_then_reconcile_freezes_it(
    sandbox: Sandbox, mount: Mount, tmp_path: Path, kind: str, mode: str
) -> None:
    state = tmp_path / "state"
    mount("-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", target=state)
    fifo = tmp_path / "fifo"
    subprocess.run(["mkfifo", str(fifo)], check=True)
    script = ["sh", "-c", f"read line < {fifo}; exit 7"]
    workload = sandbox.spawn(script) if mode == "attach" else None
    what = ["--pid", str(sandbox.inner_pid(workload)[1])] if workload else ["--", *script]
    proc = sandbox.spawn(
        ["ffrtmp", mode, "--job-id", "m", "--state-dir", str(state), *what], stderr=subprocess.PIPE
    )
    try:
        lines = read_until(proc, "started in" if mode == "run" else "adopted into")
        contract = files(sandbox, state)
        assert list(contract) == ["jobs/m.json"]
        if kind == "full":
            fill(sandbox, state)
        else:
            mount("-o", "remount,ro", target=state)
        release(fifo)
        _, err = proc.communicate(timeout=30)
        assert workload is None or workload.wait(timeout=30) == 7
    finally:
        for p in (proc, workload):
            if p is not None:
                p.kill()
                p.wait()
    assert proc.returncode == (7 if mode == "run" else 0)
    lines += err.decode().splitlines()
    assert_clean_stderr(lines)
    why = FULL if kind == "full" else RO
    assert [ln for ln in lines if why in ln] == [
        f"ffrtmp: job m: result not saved: cannot write {state}/results/m.json: {why}"
    ]
    left = files(sandbox, state)
    left.pop("filler", None)
    assert left == contract  # no result, not even a partial one; the contract intact for reconciliation
    # space (or write access) returns: reconciliation freezes the record, exactly once
    if kind == "full":
        sandbox.run(["rm", f"{state}/filler"], check=True)
    else:
        mount("-o", "remount,rw", target=state)
    wait_for(lambda: "ffrtmp-m" not in scopes(sandbox), what="the scope to go")
    for _ in range(2):
        r = sandbox.run(["ffrtmp", "reconcile", "--state-dir", str(state)])
        assert r.returncode == 0, r.stderr
        assert_clean_stderr(r.stderr.splitlines())
        frozen = files(sandbox, state)
        assert list(frozen) == ["results/m.json"]
        res = json.loads(frozen["results/m.json"])
        assert res["job_id"] == "m" and res["mode"] == mode and res["governed"] is True
        assert res["platform_sla_reason"] == "observer_lost" and res["exit_code"] is None


# -- issue 10: a state directory someone else controls is refused; the workload runs all the same --
@pytest.mark.parametrize("how", ["chmod", "chown"])
def test_an_untrusted_state_directory_keeps_no_record(sandbox: Sandbox, tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    line = untrust(state, how)
    lines = run_governed_exit_7(sandbox, tmp_path, state)
    assert [ln for ln in lines if "refusing" in ln] == [
        f"ffrtmp: job j: contract not saved, the workload runs all the same: {line}",
        f"ffrtmp: job j: result not saved: {line}",
    ]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    workload = sandbox.spawn(["sh", "-c", f"read line < {fifo}; exit 7"])
    try:
        host, pid = sandbox.inner_pid(workload)
        cgroup = Path(f"/proc/{host}/cgroup").read_text()
        r = sandbox.run(["ffrtmp", "attach", "--pid", str(pid), "--job-id", "a", "--state-dir", str(state)])
        assert (r.returncode, r.stderr) == (1, f"ffrtmp: {line}\n")
        assert workload.poll() is None and Path(f"/proc/{host}/cgroup").read_text() == cgroup  # untouched
        for cmd in (["reconcile"], ["show", "j"], ["ls", "--all"]):
            r = sandbox.run(["ffrtmp", *cmd, "--state-dir", str(state)])
            assert (r.returncode, r.stderr) == (1, f"ffrtmp: {line}\n"), cmd
        release(fifo)
        assert workload.wait(timeout=30) == 7
    finally:
        workload.kill()
        workload.wait()
    assert list(state.iterdir()) == []
    wait_for(lambda: "ffrtmp-j" not in scopes(sandbox), what="the scope to go")
