"""What /proc says about a process: adoption refusals, descendants, start time (host processes, no root)."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import wait_for

from ffrtmp_systemd.errors import FfrtmpError, UsageError
from ffrtmp_systemd.proc import check_adoptable, descendants, start_time


@pytest.fixture
def tree() -> Iterator[subprocess.Popen[bytes]]:
    """sh -> (sleep, sh -> sleep)."""
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sh -c 'sleep 30 & wait' & wait"])
    wait_for(lambda: len(descendants(proc.pid)) == 3, timeout=5, what="the tree")
    yield proc
    for pid in descendants(proc.pid):
        os.kill(pid, 9)
    proc.kill()
    proc.wait()


def test_descendants_are_all_found(tree: subprocess.Popen[bytes]) -> None:
    kids = descendants(tree.pid)
    assert len(kids) == 3
    assert all(Path(f"/proc/{k}").exists() for k in kids)


def test_start_time_is_the_process_own(tree: subprocess.Popen[bytes]) -> None:
    assert abs(start_time(tree.pid) - datetime.now(UTC)) < timedelta(seconds=5)
    assert start_time(1) < start_time(tree.pid)


def test_an_ordinary_process_is_adoptable(tree: subprocess.Popen[bytes]) -> None:
    check_adoptable(tree.pid)


def zombie() -> int:
    proc = subprocess.Popen(["true"])
    wait_for(
        lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(")")[1].split()[0] == "Z", what="a zombie"
    )
    zombie.keep = proc  # type: ignore[attr-defined]  # not reaped until the test module ends
    return proc.pid


@pytest.mark.parametrize(("pid", "message"), [
    (lambda: 1, "refusing PID 1: the init process cannot be adopted"),
    (lambda: 2, "refusing PID 2: it is a kernel thread"),
    (os.getpid, "it is this wrapper or one of its ancestors"),
    (os.getppid, "it is this wrapper or one of its ancestors"),
    (zombie, "it has already exited (zombie)"),
    (lambda: 4_000_000, "no process with PID 4000000"),
])  # fmt: skip
def test_refusals(pid: object, message: str) -> None:
    with pytest.raises(FfrtmpError) as err:
        check_adoptable(pid())  # type: ignore[operator]
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("pid", [0, -1])
def test_non_positive_pids_are_usage_errors(pid: int) -> None:
    with pytest.raises(UsageError):
        check_adoptable(pid)


def test_descendants_include_children_of_every_thread() -> None:
    """A child forked by a thread other than the main one is listed in that thread's children file only."""
    code = (
        "import subprocess, threading, time\n"
        "def spawn():\n"
        "    print(subprocess.Popen(['sleep', '30']).pid, flush=True)\n"
        "    time.sleep(30)  # a thread that ends leaves its children to the main thread\n"
        "threading.Thread(target=spawn).start()\n"
    )
    proc = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        kid = int(proc.stdout.readline())
        assert descendants(proc.pid) == [kid]
    finally:
        os.kill(kid, 9)
        proc.kill()
        proc.wait()
