"""`ffrtmp reconcile` on a real systemd: orphans frozen `observer_lost` exactly once, the rest left alone."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Ffrtmp, orphan, result_of, scopes, wait_for
from sandbox import Sandbox

from ffrtmp_systemd.proc import identity
from ffrtmp_systemd.reconcile import LeftAlone, Reconciler, reconcile_job
from ffrtmp_systemd.report.result import Contract, Mode, Outcome, Reason, Result, freeze, rfc3339, to_json
from ffrtmp_systemd.report.store import Store
from ffrtmp_systemd.systemd.bus import Bus

DEAD = int(Path("/proc/sys/kernel/pid_max").read_text())  # above every PID that can exist


def contract(job: str, pid: int = DEAD, wrapper: int = DEAD, start: datetime | None = None) -> Contract:
    started = start or datetime.now(UTC)
    return Contract(job, Mode.RUN, pid, f"ffrtmp-{job}.scope", {}, None, wrapper, rfc3339(started), ["x"])


@pytest.fixture
def sleeper(sandbox: Sandbox) -> Iterator[tuple[int, int]]:
    """A live process inside the sandbox: (host PID, sandbox PID)."""
    proc = sandbox.spawn(["sleep", "300"])
    pids = sandbox.inner_pid(proc)
    yield pids
    os.kill(pids[0], signal.SIGKILL)
    proc.wait()


def test_orphan_is_left_alone_while_its_scope_runs_then_frozen_exactly_once(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    orphan(sandbox, state_dir, "k9", fifo)
    r = ffrtmp("reconcile")
    assert (r.returncode, r.stdout) == (0, "")
    assert r.stderr.strip().splitlines()[-1] == "ffrtmp: job k9 left alone: ffrtmp-k9.scope is active"
    assert (state_dir / "jobs" / "k9.json").exists()

    fifo.write_text("go\n")
    wait_for(lambda: "ffrtmp-k9" not in scopes(sandbox), what="the scope to go")
    r = ffrtmp("reconcile")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(
        "JOB k9 | mode=run | intent=- | sla=VIOLATION | reason=observer_lost | runtime="
    )
    assert "| exit=- |" in r.stdout and len(r.stdout.splitlines()) == 1
    res = result_of(state_dir, "k9")
    assert res["platform_sla_reason"] == "observer_lost" and res["platform_sla_compliant"] is False
    assert (res["exit_code"], res["signal"], res["oom_killed"]) == (None, None, False)
    assert res["end_time"] >= res["start_time"]
    assert not (state_dir / "jobs" / "k9.json").exists()
    frozen = (state_dir / "results" / "k9.json").read_bytes()
    again = ffrtmp("reconcile")
    assert (again.returncode, again.stdout) == (0, "")
    assert (state_dir / "results" / "k9.json").read_bytes() == frozen


def test_a_live_wrapper_keeps_its_job(ffrtmp: Ffrtmp, state_dir: Path, sleeper: tuple[int, int]) -> None:
    """The process with the wrapper's PID is the wrapper: the same boot id and start time (what a wrapper
    records of itself; a stranger with that PID is tested below)."""
    Store(state_dir).claim(replace(contract("w", wrapper=sleeper[1]), wrapper_id=identity(sleeper[0])))
    r = ffrtmp("reconcile")
    assert r.stderr.strip() == f"ffrtmp: job w left alone: its wrapper (PID {sleeper[1]}) is running"
    assert (state_dir / "jobs" / "w.json").exists() and not (state_dir / "results").exists()


def test_a_live_workload_keeps_its_job_but_a_reused_pid_does_not(
    ffrtmp: Ffrtmp, state_dir: Path, sleeper: tuple[int, int]
) -> None:
    store = Store(state_dir)
    store.claim(contract("ungoverned", pid=sleeper[1]))  # started before the contract: the workload
    store.claim(contract("reused", pid=sleeper[1], start=datetime.now(UTC) - timedelta(hours=1)))
    r = ffrtmp("reconcile")
    assert r.returncode == 0
    left = f"ffrtmp: job ungoverned left alone: its workload (PID {sleeper[1]}) is running"
    assert left in r.stderr.splitlines()
    assert r.stdout.startswith("JOB reused | mode=run |") and "reason=observer_lost" in r.stdout
    assert (state_dir / "jobs" / "ungoverned.json").exists()
    assert result_of(state_dir, "reused")["platform_sla_reason"] == "observer_lost"


def test_a_result_frozen_by_the_wrapper_wins(ffrtmp: Ffrtmp, state_dir: Path) -> None:
    """The wrapper froze its result and died before removing its contract."""
    c = contract("late")
    store = Store(state_dir)
    store.freeze(freeze(c, Outcome(datetime.now(UTC), exit_code=0), True, None))
    (state_dir / "jobs").mkdir(exist_ok=True)
    (state_dir / "jobs" / "late.json").write_text(to_json(c))
    before = (state_dir / "results" / "late.json").read_bytes()
    r = ffrtmp("reconcile")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert not (state_dir / "jobs" / "late.json").exists()
    assert (state_dir / "results" / "late.json").read_bytes() == before
    assert result_of(state_dir, "late")["platform_sla_reason"] == "completed_within_limits"


WRITER = """
import os, sys, time
from pathlib import Path
from ffrtmp_systemd.report.result import Contract, Mode
from ffrtmp_systemd.report.store import Store
os.fsync = lambda fd: time.sleep(300)  # stuck after writing, before the file is linked into place
job, start = sys.argv[2], "2026-11-30T12:00:00.000000Z"
c = Contract(job, Mode.RUN, 1, f"ffrtmp-{job}.scope", {}, None, os.getpid(), start, ["x"])
Store(Path(sys.argv[1])).claim(c)
"""


def test_a_writer_killed_mid_write_leaves_nothing_after_reconcile(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path
) -> None:
    """kill -9 between writing a contract and linking it leaves a temp file; only a dead writer's goes."""
    writers = {
        job: sandbox.spawn([sys.executable, "-c", WRITER, str(state_dir), job]) for job in ("dead", "live")
    }
    temps = {
        job: state_dir / "jobs" / f".{job}.json.{sandbox.inner_pid(w)[1]}.tmp" for job, w in writers.items()
    }
    wait_for(lambda: all(t.exists() for t in temps.values()), what="both writers mid-write")
    os.kill(sandbox.inner_pid(writers["dead"])[0], signal.SIGKILL)
    writers["dead"].wait(timeout=20)
    r = ffrtmp("reconcile")
    assert (r.returncode, r.stdout) == (0, "")
    assert f"removed {temps['dead']}, left by PID" in r.stderr
    assert sorted(p.name for p in (state_dir / "jobs").iterdir()) == [temps["live"].name]

    os.kill(sandbox.inner_pid(writers["live"])[0], signal.SIGKILL)
    writers["live"].wait(timeout=20)
    assert ffrtmp("reconcile").returncode == 0
    assert list((state_dir / "jobs").iterdir()) == [] and not (state_dir / "results").exists()


def test_two_reconcilers_at_once_freeze_each_orphan_once(sandbox: Sandbox, state_dir: Path) -> None:
    store = Store(state_dir)
    jobs = [f"o{i}" for i in range(20)]
    for job in jobs:
        store.claim(contract(job))
    env = {"FFRTMP_STATE_DIR": str(state_dir)}
    procs = [sandbox.spawn(["ffrtmp", "reconcile"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    lines = sorted(ln.split(" | ")[0] for out, _ in outs for ln in out.decode().splitlines())
    assert lines == sorted(f"JOB {j}" for j in jobs)
    assert sorted(p.stem for p in (state_dir / "results").iterdir()) == sorted(jobs)
    assert list((state_dir / "jobs").iterdir()) == []


async def test_concurrent_reconcile_of_one_job_in_one_process(
    sandbox: Sandbox, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIDs here are host PIDs: DEAD is dead in every namespace, so this runs outside the sandbox."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", sandbox.bus_address)
    store = Store(state_dir)
    store.claim(contract("race"))
    bus = await Bus.connect()
    try:
        got = await asyncio.gather(*(reconcile_job(store, bus, "race") for _ in range(8)))
    finally:
        bus.close()
    frozen = [r for r in got if isinstance(r, Result)]
    assert len(frozen) == 1 and not any(isinstance(r, LeftAlone) for r in got)
    assert frozen[0].platform_sla_reason is Reason.OBSERVER_LOST and frozen[0].exit_code is None
    assert store.result("race") == frozen[0]


async def test_a_job_its_host_observes_is_left_to_the_host(
    sandbox: Sandbox, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent follows its own jobs and freezes them itself: its Reconciler never touches them, at
    start or when their scope goes; the others (an orphan) it reconciles as ever."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", sandbox.bus_address)
    store = Store(state_dir)
    store.claim(contract("mine"))
    store.claim(contract("orphan"))
    bus = await Bus.connect()
    try:
        rec = Reconciler(store, bus, lambda job: None, observed=lambda job: job == "mine")
        await rec.reconcile_all()
        await rec.reconcile("mine")  # as when its scope is removed
        rec.close()
    finally:
        bus.close()
    assert store.result("mine") is None and store.contract("mine") is not None
    result = store.result("orphan")
    assert result is not None and result.platform_sla_reason is Reason.OBSERVER_LOST


# -- issue 10: bad records are named and skipped; a live PID is the wrapper only if it is the same process --
THREAD = (
    "import threading, time; t = threading.Thread(target=time.sleep, args=(300,)); t.start(); "
    "print(t.native_id, flush=True)"
)


def record(state_dir: Path, job: str, **fields: object) -> None:
    """A contract file as a careless hand, an older version or another boot left it."""
    d = json.loads(to_json(contract(job)))
    d.update(fields)
    (state_dir / "jobs").mkdir(exist_ok=True)
    (state_dir / "jobs" / f"{job}.json").write_text(json.dumps(d))


def test_bad_records_are_named_and_skipped_the_others_reconciled(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path
) -> None:
    record(state_dir, "a-yesterday", start_time="yesterday")
    record(state_dir, "b-nan", wrapper_pid="abc")
    os.mkfifo(state_dir / "jobs" / "c-fifo.json")  # once hung reconcile forever
    (state_dir / "jobs" / "d-link.json").symlink_to(state_dir / "jobs" / "z-good.json")
    proc = sandbox.spawn(["python3", "-c", THREAD], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        tid = int(proc.stdout.readline())  # a live thread, not a process: never anyone's wrapper
        record(state_dir, "t-thread", wrapper_pid=tid)
        record(state_dir, "z-good")
        r = ffrtmp("reconcile")
    finally:
        proc.kill()
        proc.wait()
    jobs = state_dir / "jobs"
    assert r.returncode == 1
    assert [ln for ln in r.stderr.splitlines() if "result frozen" not in ln] == [
        f"ffrtmp: job a-yesterday: not reconciled: bad record {jobs}/a-yesterday.json: "
        "start_time: 'yesterday' is not an RFC 3339 time",
        f"ffrtmp: job b-nan: not reconciled: bad record {jobs}/b-nan.json: "
        "wrapper_pid: 'abc' is not a valid int",
        f"ffrtmp: job c-fifo: not reconciled: bad record {jobs}/c-fifo.json: not a regular file",
        f"ffrtmp: job d-link: not reconciled: bad record {jobs}/d-link.json: a symbolic link",
    ]
    assert [ln.split(" | ")[0] for ln in r.stdout.splitlines()] == ["JOB t-thread", "JOB z-good"]
    assert result_of(state_dir, "t-thread")["platform_sla_reason"] == "observer_lost"
    assert sorted(p.stem for p in jobs.iterdir()) == ["a-yesterday", "b-nan", "c-fifo", "d-link"]


def test_a_live_pid_that_is_not_the_wrapper_does_not_keep_its_job(
    ffrtmp: Ffrtmp, state_dir: Path, sleeper: tuple[int, int]
) -> None:
    """After a reboot the wrapper's PID is some other process: its boot id and start time tell."""
    pid = sleeper[1]
    other_boot = "00000000-0000-0000-0000-000000000000:4242"
    record(state_dir, "rebooted", wrapper_pid=pid, wrapper_id=other_boot)
    record(state_dir, "old-boot", wrapper_pid=pid, start_time="2000-01-01T00:00:00.000000Z")  # no wrapper_id
    record(state_dir, "this-boot", wrapper_pid=pid)  # no wrapper_id, of this boot: taken for the wrapper
    r = ffrtmp("reconcile")
    assert r.returncode == 0, r.stderr
    assert [ln.split(" | ")[0] for ln in r.stdout.splitlines()] == ["JOB old-boot", "JOB rebooted"]
    assert [ln for ln in r.stderr.splitlines() if "frozen" not in ln] == [
        f"ffrtmp: job this-boot left alone: its wrapper (PID {pid}) is running"
    ]
    assert result_of(state_dir, "rebooted")["platform_sla_reason"] == "observer_lost"


def test_a_real_wrapper_records_its_identity(sandbox: Sandbox, state_dir: Path, tmp_path: Path) -> None:
    orphan(sandbox, state_dir, "me", tmp_path / "go")  # its wrapper killed -9 once its scope existed
    c = json.loads((state_dir / "jobs" / "me.json").read_text())
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert c["wrapper_id"].split(":")[0] == boot and c["wrapper_id"].split(":")[1].isdigit()
    (tmp_path / "go").write_text("go\n")
