"""Process events on this machine (root in the initial namespaces: the connector works here) and the one
refusal line where it cannot (the namespace sandbox, a non-root user)."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IN_CI
from sandbox import REPO, Sandbox

from ffrtmp_systemd.procevents import BATCH, Event, Exec, Exit, ProcEvents, why_unavailable

pytestmark = pytest.mark.timeout(60)
RULES = '[[rule]]\nname = "r"\nexe = "ffmpeg"\n'
REFUSAL = "ffrtmp: process events unavailable: "


def need_events() -> None:
    if (why := why_unavailable()) is not None:
        if IN_CI:
            pytest.fail(f"CI=true but process events are unavailable: {why}")
        pytest.skip(f"process events unavailable: {why}")


@pytest.fixture
def events() -> Iterator[ProcEvents]:
    need_events()
    pe = ProcEvents()
    yield pe
    pe.close()


def until(pe: ProcEvents, *pids: int) -> list[Event]:
    """Events (blocking on the socket, no timer) until the exit events of all `pids`."""
    seen: list[Event] = []
    while not set(pids) <= {e.pid for e in seen if isinstance(e, Exit)}:
        select.select([pe], [], [])
        seen += pe.read()
    return seen


def test_exec_and_exit_of_processes_started_by_an_unrelated_shell(events: ProcEvents) -> None:
    out = subprocess.run(
        ["sh", "-c", "sh -c 'exit 7' & a=$!; sh -c 'kill -TERM $$' & b=$!; sh -c 'kill -9 $$' & c=$!; "
         "wait; echo $a $b $c"], capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    a, b, c = map(int, out)
    seen = [e for e in until(events, a, b, c) if e.pid in (a, b, c)]
    assert [e for e in seen if isinstance(e, Exec)] == [
        e for e in seen if isinstance(e, Exec) and e.at_ns > 0
    ]
    assert {e.pid for e in seen if isinstance(e, Exec)} == {a, b, c}
    exits = {e.pid: (e.exit_code, e.signal) for e in seen if isinstance(e, Exit)}
    assert exits == {a: (7, None), b: (None, signal.SIGTERM), c: (None, signal.SIGKILL)}


def test_a_thread_ending_is_not_its_process_ending(events: ProcEvents) -> None:
    code = (
        "import threading as t; t = t.Thread(target=lambda: None); t.start(); t.join(); raise SystemExit(3)"
    )
    p = subprocess.Popen(["python3", "-c", code])
    p.wait()
    exits = [e for e in until(events, p.pid) if isinstance(e, Exit)]
    assert [(e.exit_code, e.signal) for e in exits if e.pid == p.pid] == [(3, None)]


async def test_a_burst_is_handed_to_a_listener_in_batches(events: ProcEvents) -> None:
    """A flood of exec events (thousands of short processes, anyone can start them) waiting in the socket:
    a listener gets at most BATCH at each wakeup, so the loop's other work takes turns with them (one
    callback with all of them held the agent's loop for 0.35-0.98 s with 3,000 waiting: bench/flood.py)."""
    n = 3 * BATCH
    script = f"for i in $(seq {n}); do /bin/true; done; echo $$"
    shell = int(subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout)
    batches: list[list[Event]] = []
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def got(batch: list[Event]) -> None:
        batches.append(batch)
        if any(isinstance(e, Exit) and e.pid == shell for e in batch) and not done.done():
            done.set_result(None)

    events.listen(loop, got)
    await done
    assert len(batches) >= 2 * n // BATCH and max(len(b) for b in batches) <= BATCH, [len(b) for b in batches]


def test_read_never_blocks(events: ProcEvents) -> None:
    events.read()  # whatever is there
    assert isinstance(events.read(), list)  # and again, with nothing: [] at once, no exception


def test_refused_with_one_line_in_the_namespace_sandbox(sandbox: Sandbox, tmp_path: Path) -> None:
    (tmp_path / "w.toml").write_text(RULES)
    r = sandbox.run(
        ["ffrtmp", "watch", "--config", str(tmp_path / "w.toml")], env={"FFRTMP_STATE_DIR": str(tmp_path)}
    )
    why = "this process is not in the host's initial PID and user namespaces (a container or a sandbox)"
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"{REFUSAL}{why}\n")
    assert os.listdir(tmp_path) == ["w.toml"]  # nothing left behind


def test_refused_with_one_line_to_a_user_other_than_root() -> None:
    need_events()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:  # pytest's own are root's only
        os.chmod(d, 0o755)
        Path(d, "w.toml").write_text(RULES)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        env = {"PATH": "/usr/bin:/bin", "FFRTMP_STATE_DIR": d}
        r = subprocess.run(
            [*nobody, str(REPO / ".venv/bin/ffrtmp"), "watch", "--config", f"{d}/w.toml"],
            capture_output=True, text=True, cwd="/", env=env,
        )  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"{REFUSAL}it needs root (CAP_NET_ADMIN)\n")
