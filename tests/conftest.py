"""Shared fixtures: real systemd sandboxes, skipped with a reason where they cannot boot."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Exporter, read_until, wait_for, wakeups  # noqa: F401  (read_until, wakeups: for the tests)
from sandbox import Sandbox, why_unavailable
from vm import VM
from vm import why_unavailable as vm_unavailable

IN_CI = os.environ.get("CI") == "true"
# Test files live under /var/tmp (numbered per run, safe for concurrent runs), never loose in /tmp:
# a sandbox shares the host's file system.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", "/var/tmp")


def _need(what: str, reason: str | None) -> None:
    """Skip (or, under CI=true, fail) when this machine cannot give `what`."""
    if reason is not None and IN_CI:
        pytest.fail(f"CI=true but the {what} cannot boot: {reason}")
    if reason is not None:
        pytest.skip(f"{what} unavailable: {reason}")


def need_sandbox() -> None:
    _need("systemd sandbox", why_unavailable())


MODES = ("in-process", "agent")
SANDBOX_FIXTURES = {"sandbox", "fresh_sandbox"}


def agent_mode(config: pytest.Config) -> bool:
    """--mode agent: every sandbox of the fixtures starts ffrtmp.socket (the installed mode)."""
    return bool(config.getoption("--mode", default="in-process") == "agent")


@pytest.fixture(scope="module")
def sandbox(pytestconfig: pytest.Config) -> Iterator[Sandbox]:
    """One sandbox shared by a test module, in the mode of --mode."""
    need_sandbox()
    with Sandbox(agent=agent_mode(pytestconfig)) as sb:
        yield sb


@pytest.fixture
def fresh_sandbox(pytestconfig: pytest.Config) -> Iterator[Sandbox]:
    """A sandbox of its own, for a test that breaks it, in the mode of --mode."""
    need_sandbox()
    with Sandbox(agent=agent_mode(pytestconfig)) as sb:
        yield sb


def need_vm() -> None:
    _need("Debian VM", vm_unavailable())


@pytest.fixture(scope="module")
def vm() -> Iterator[VM]:
    """One VM session per test module: `vm.boot([Script(...), ...])` boots it and runs the scripts
    in order; a second `vm.boot()` reboots the same root disk. Mark the module `vm` and give its
    tests a timeout for the boot (the image build, once, takes a minute or two more)."""
    need_vm()
    with VM() as session:
        yield session


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


Ffrtmp = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def ffrtmp(sandbox: Sandbox, state_dir: Path) -> Ffrtmp:
    """Run `ffrtmp ARGS...` inside the module's sandbox with this test's state directory."""

    def call(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
        return sandbox.run(["ffrtmp", *args], env={"FFRTMP_STATE_DIR": str(state_dir)}, timeout=timeout, **kw)

    return call


def result_of(state_dir: Path, job: str) -> dict[str, Any]:
    """The frozen result of `job` as the operator reads it."""
    return dict(json.loads((state_dir / "results" / f"{job}.json").read_text()))


def scopes(sandbox: Sandbox) -> str:
    """The ffrtmp scopes systemd has loaded, as `systemctl list-units` prints them."""
    r = sandbox.systemctl("list-units", "--all", "--plain", "--no-legend", "ffrtmp-*.scope")
    return r.stdout.strip()


def release(fifo: Path) -> None:
    """Let a workload like `sh -c 'read l < FIFO; exit 7'` go on (ENXIO if it is gone already)."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, b"go\n")
    os.close(fd)


def try_release(fifo: Path, word: str = "go") -> bool:
    """Write a line to a FIFO if someone reads it; False (ENXIO) while no one does yet."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ENXIO:
            return False
        raise
    os.write(fd, f"{word}\n".encode())
    os.close(fd)
    return True


def hold_start_jobs(sandbox: Sandbox, fifo: Path) -> None:
    """Make ffrtmp.slice's start, so every scope's start job, wait for a line on `fifo`: 0 go on, 1 fail."""
    units = sandbox.dir / "units"
    (units / "hold.service").write_text(
        "[Unit]\nDefaultDependencies=no\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        f"ExecStart=/bin/sh -c 'read x < {fifo}; exit $x'\n"
    )
    (units / "ffrtmp.slice.d").mkdir()
    (units / "ffrtmp.slice.d" / "hold.conf").write_text("[Unit]\nRequires=hold.service\nAfter=hold.service\n")
    assert sandbox.systemctl("daemon-reload").returncode == 0


def start_job_queued(sandbox: Sandbox, unit: str) -> bool:
    jobs = sandbox.systemctl("list-jobs", "--no-legend", "--plain").stdout.split("\n")
    return any(line.split()[1:3] == [unit, "start"] for line in jobs if line.strip())


def orphan(sandbox: Sandbox, state_dir: Path | str, job: str, fifo: Path, in_process: bool = True) -> None:
    """`ffrtmp run` of a workload that waits for a line on `fifo` (made here); once its scope exists
    (its contract was written before), the wrapper is killed -9: a job left to reconciliation. In-process
    in either test mode (FFRTMP_AGENT_SOCKET=none: where an agent runs, a client killed -9 leaves its job
    to the agent, no orphan); `in_process=False`: through the agent if one runs (it freezes the job)."""
    os.mkfifo(fifo)
    run = ["ffrtmp", "run", "--state-dir", str(state_dir), "--job-id", job, "--"]
    env = {"FFRTMP_AGENT_SOCKET": "none"} if in_process else {}
    wrapper = sandbox.spawn([*run, "sh", "-c", f"read x < {fifo}"], env=env, stderr=subprocess.DEVNULL)
    host_wrapper = sandbox.inner_pid(wrapper)[0]
    wait_for(lambda: f"ffrtmp-{job}.scope" in scopes(sandbox), what="the scope")
    os.kill(host_wrapper, signal.SIGKILL)
    wrapper.wait(timeout=20)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--part", choices=("sandbox", "vm"), help="only the sandbox tests, or only the VM's")
    parser.addoption(
        "--mode",
        choices=MODES,
        default="in-process",
        help="in-process (default): no agent in the sandboxes, run and attach govern in their own process; "
        "agent: ffrtmp.socket started in every sandbox of the fixtures, and only the tests that use one run",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mode(name): a test of one mode only (in-process or agent); the other mode leaves it out"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--part keeps one part of the suite (scripts/test.sh runs the VM's after the sandbox's). Then files
    that hold slow tests first, each file's order kept: with a worker per file, the longest files start
    at once rather than last."""
    part, mode = config.getoption("--part"), config.getoption("--mode")
    keep = [item for item in items if _selected(item, part, mode)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def _selected(item: pytest.Item, part: str | None, mode: str) -> bool:
    """In --part, and in --mode: a test marked mode(M) runs in mode M only; in agent mode only the tests
    that use a sandbox fixture run (the others do not depend on the mode: in-process runs them)."""
    if part is not None and (item.get_closest_marker("vm") is not None) != (part == "vm"):
        return False
    marker = item.get_closest_marker("mode")
    if marker is not None:
        return bool(marker.args[0] == mode)
    return mode == "in-process" or bool(SANDBOX_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.fixture
def exporter(sandbox: Sandbox, state_dir: Path) -> Iterator[Exporter]:
    ex = Exporter(sandbox, state_dir)
    yield ex
    ex.stop()
