"""Watch dispatch with real processes and real process events on this machine, up to the adoption hook:
every matching process handed over exactly once (exec event or the /proc pass at start), nothing else."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import Ffrtmp, result_of, wait_for
from sandbox import Sandbox
from test_procevents import need_events

from ffrtmp_systemd.agent import Host
from ffrtmp_systemd.discover import Candidate, Watcher, facts, unit_of
from ffrtmp_systemd.observe.watch import Watch
from ffrtmp_systemd.procevents import Event, Exec, Exit, ProcEvents
from ffrtmp_systemd.report.result import Contract, Mode, Reason, rfc3339
from ffrtmp_systemd.report.store import Store
from ffrtmp_systemd.rules import Rules, load
from ffrtmp_systemd.wrapper.govern import Job
from ffrtmp_systemd.wrapper.job import logged

pytestmark = pytest.mark.timeout(60)
N = 50


def spawn(*durations: str) -> list[int]:
    """`sleep D` for each D, started at once by a shell that then exits (their launcher is not us)."""
    script = 'for d in "$@"; do sleep "$d" >/dev/null 2>&1 & echo $!; done'
    out = subprocess.run(["sh", "-c", script, "sh", *durations], capture_output=True, text=True, check=True)
    return [int(p) for p in out.stdout.split()]


async def test_every_matching_process_is_handed_to_the_hook_exactly_once(tmp_path: Path) -> None:
    need_events()
    nonce = f"{os.getpid()}{time.monotonic_ns() % 10**6}"
    (tmp_path / "w.toml").write_text(
        f'[[rule]]\nname = "rtmp"\nexe = "sleep"\nargv = "^1000\\\\.{nonce}$"\ncpu-quota = 50\n'
    )
    rules = load(tmp_path / "w.toml")
    (before,) = spawn(f"1000.{nonce}")  # running before the watch starts
    got: list[Candidate] = []
    latency: list[int] = []
    exec_ns: dict[int, int] = {}
    exits: dict[int, Exit] = {}
    all_in, all_out = asyncio.Event(), asyncio.Event()

    async def adopt(c: Candidate) -> None:
        got.append(c)
        if c.process.pid in exec_ns:
            latency.append(time.monotonic_ns() - exec_ns[c.process.pid])
        if len(got) == N + 1:
            all_in.set()

    def exited(e: Exit) -> None:
        if e.pid in {c.process.pid for c in got}:
            exits[e.pid] = e
            if len(exits) == N + 1:
                all_out.set()

    source, pids = ProcEvents(), [before]
    w = Watcher(rules, adopt, source, exited)

    def on_events(events: list[Event]) -> None:
        exec_ns.update((e.pid, e.at_ns) for e in events if isinstance(e, Exec))
        w.on_events(events)

    try:
        source.listen(asyncio.get_running_loop(), on_events)
        w.scan()
        pids += spawn(*[f"1000.{nonce}"] * N, f"1001.{nonce}")
        matching, other = pids[1 : N + 1], pids[N + 1]
        await all_in.wait()
        assert sorted(c.process.pid for c in got) == sorted([before, *matching])
        assert len({c.job_id for c in got}) == N + 1
        assert all(c.job_id == f"rtmp-{c.process.pid}-{c.process.start_ticks}" and not c.force for c in got)
        assert all(c.rule.attach_args == ("--cpu-quota", "50") for c in got)
        assert [c.process.pid for c in got if c.exec_ns is None] == [before]  # the /proc pass: no exec event
        w.scan()  # a second pass (as after lost events) hands over nothing again
        for p in pids:
            os.kill(p, signal.SIGKILL)
        await all_out.wait()  # every exec event was read before these exits
        assert len(got) == N + 1 and other not in {c.process.pid for c in got}
        assert {(e.exit_code, e.signal) for e in exits.values()} == {(None, signal.SIGKILL)}
    finally:
        source.close()
        for p in pids:  # on a failure too: nothing left sleeping
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    latency.sort()
    print(f"exec -> hook over {len(latency)}: p50 {latency[len(latency) // 2] / 1e6:.2f} ms, "
          f"p99 {latency[len(latency) * 99 // 100] / 1e6:.2f} ms")  # fmt: skip


def test_facts_of_a_live_process_and_of_none() -> None:
    p = subprocess.Popen(["sleep", "60"])
    try:
        rules_file = Path(f"/var/tmp/ffrtmp-facts-{os.getpid()}.toml")
        rules_file.write_text('[[rule]]\nname = "s"\nexe = "sleep"\n')
        try:
            rules = load(rules_file)
        finally:
            rules_file.unlink()
        f = facts(p.pid, rules)
        assert f is not None and f.argv == ("sleep", "60") and f.uid == os.getuid()
        assert f.exe == os.path.realpath("/usr/bin/sleep") and f.pid == p.pid
        assert facts(os.getpid(), rules) is None  # not an executable any rule wants
    finally:
        p.kill()
        p.wait()
    assert facts(p.pid, rules) is None  # gone


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/nginx.service\n", "nginx.service"),
        ("0::/system.slice/nginx.service/worker\n", "nginx.service"),  # a delegated subtree
        ("0::/user.slice/user-1000.slice/session-2.scope\n", "session-2.scope"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.service\n", "user@1000.service"),
        ("0::/\n", None),
        ("0::/..\n", None),  # outside this cgroup namespace (a process entered from the host)
        ("12:memory:/x\n1:name=systemd:/system.slice/a.service\n0::/system.slice/a.service\n", "a.service"),
        ("1:name=systemd:/init.scope\n", "init.scope"),
    ],
)
def test_the_unit_of_a_cgroup_is_systemds(cgroup: str, unit: str | None) -> None:
    assert unit_of(cgroup) == unit


# The adoption itself, against a real systemd (the namespace sandbox, where process events are refused):
# the /proc pass hands what is already running to the same hook as exec events do.
SCAN = """
import asyncio, sys
from pathlib import Path
from ffrtmp_systemd.agent import Host
from ffrtmp_systemd.discover import Watcher, adopt
from ffrtmp_systemd.report.store import Store
from ffrtmp_systemd.rules import load
from ffrtmp_systemd.systemd.bus import Bus

async def main():
    bus = await Bus.connect(broad=True)
    host, store = Host(bus, asyncio.Lock(), agent=True), Store(Path(sys.argv[2]))
    stop = asyncio.get_running_loop().create_future()
    w = Watcher(load(Path(sys.argv[1])), lambda c: adopt(host, store, c, w.exit_status, stop))
    w.scan()
    print(len(w.tasks), flush=True)
    while w.tasks:
        await asyncio.gather(*w.tasks)

asyncio.run(main())
"""
SANDBOX_RULES = """
[[rule]]
name = "shell"
exe = "sleep"
argv = "^301$"
memory-max = "64M"
cpu-quota = 50
intent = "test"

[[rule]]
name = "svc"
exe = "sleep"
argv = "^30[23]$"
unit = "named.service"
memory-max = "32M"
"""


def test_the_proc_pass_adopts_what_the_rules_match_and_nothing_else(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "w.toml").write_text(SANDBOX_RULES)
    shell = [sandbox.spawn(["sleep", d]) for d in ("301", "301", "304")]
    for unit, d in (("named", "302"), ("other", "303")):
        assert sandbox.run(["systemd-run", "--quiet", f"--unit={unit}", "sleep", d]).returncode == 0
    pids = {
        d: sandbox.run(["pgrep", "-f", f"^(/usr/bin/)?sleep {d}$"]).stdout.split()
        for d in ("301", "302", "303")
    }
    watch = sandbox.spawn(
        ["python", "-c", SCAN, str(tmp_path / "w.toml"), str(state_dir)], stdout=subprocess.PIPE
    )
    try:
        assert watch.stdout is not None and watch.stdout.readline() == b"3\n"  # two shells' and the named one
        jobs = [f"shell-{p}-" for p in pids["301"]] + [f"svc-{pids['302'][0]}-"]

        def scopes() -> list[str]:
            units = sandbox.systemctl(
                "list-units", "--plain", "--no-legend", "--state=active", "ffrtmp-*.scope"
            )
            return sorted(line.split()[0] for line in units.stdout.splitlines())

        units = wait_for(lambda: len(s := scopes()) == 3 and s, what="three scopes")
        assert sorted(u.rpartition("-")[0] + "-" for u in units) == sorted(f"ffrtmp-{j}" for j in jobs)
        memory = {u: sandbox.cgroup_file("memory", f"/ffrtmp.slice/{u}", "memory.limit_in_bytes").read_text()
                  for u in units}  # fmt: skip
        assert sorted(int(m) for m in memory.values()) == [32 << 20, 64 << 20, 64 << 20]
        running = json.loads(ffrtmp("ls", "--json").stdout)["running"]  # which rule made each: its contract
        assert sorted(j["origin"] for j in running) == ["watch:shell", "watch:shell", "watch:svc"]
        rows = [ln.split() for ln in ffrtmp("ls").stdout.splitlines()]
        assert sorted(r[2] for r in rows[1:]) == ["watch:shell", "watch:shell", "watch:svc"]
        assert (
            sandbox.systemctl("is-active", "other.service").stdout.strip() == "active"
        )  # not named: untouched
        for u in units:
            sandbox.systemctl("kill", "--signal=KILL", u)
        assert watch.wait(timeout=30) == 0
    finally:
        for p in [*shell, watch]:
            p.kill()
        sandbox.systemctl("stop", "named.service", "other.service")
    results = [result_of(state_dir, u.removeprefix("ffrtmp-").removesuffix(".scope")) for u in units]
    assert {(r["mode"], r["governed"], r["exit_code"]) for r in results} == {("attach", True, None)}
    assert sorted(str(r["origin_unit"]) for r in results) == ["None", "None", "named.service"]
    assert {r["intent"] for r in results if r["job_id"].startswith("shell-")} == {"test"}
    assert sorted(r["origin"] for r in results) == ["watch:shell", "watch:shell", "watch:svc"]
    rows = [ln.split() for ln in ffrtmp("ls", "--all").stdout.split("\n\n")[1].splitlines()]
    assert rows[0][2] == "ORIGIN" and sorted(r[2] for r in rows[1:]) == [
        "watch:shell",
        "watch:shell",
        "watch:svc",
    ]
    done = json.loads(ffrtmp("ls", "--all", "--json").stdout)["results"]
    assert sorted(r["origin"] for r in done) == ["watch:shell", "watch:shell", "watch:svc"]


# The exit events a Watcher keeps for the records. The sandbox refuses the process-events connector: the
# events are handed in here as the connector gives them (parsed); the real one is judged in the VM
# (tests/test_vm_product.py: a plain attach through the agent with rules, a watch job resumed after kill -9).
def _rules(tmp_path: Path) -> Rules:
    (tmp_path / "w.toml").write_text('[[rule]]\nname = "r"\nexe = "never-run-by-this-test"\n')
    return load(tmp_path / "w.toml")


async def _never(c: Candidate) -> None:
    raise AssertionError(f"nothing matches here: {c}")


async def test_only_expected_pids_keep_their_exit_event_until_forgotten(tmp_path: Path) -> None:
    w = Watcher(_rules(tmp_path), _never)
    w.on_events([Exit(100, 7, None, 1)])
    assert w.exit_status(100) == (None, None)  # not expected: not kept
    w.expect(100)
    w.expect(100)  # e.g. a watch adoption refused for it while an attach holds it
    w.on_events([Exit(100, None, signal.SIGKILL, 2), Exit(100, 3, None, 3), Exit(101, 1, None, 4)])
    assert w.exit_status(100) == (None, signal.SIGKILL)  # the first: a later one is a reused PID's
    assert w.exit_status(101) == (None, None)
    w.forget(100)
    assert w.exit_status(100) == (None, signal.SIGKILL)  # the other still wants it
    w.forget(100)
    assert w.exit_status(100) == (None, None)
    w.expect(100)
    assert w.exit_status(100) == (None, None)  # a new expectation starts empty


async def test_the_hosts_attach_job_is_frozen_with_its_expected_exit_status(tmp_path: Path) -> None:
    """The agent's Host: an attach job whose PID it expected gets the exit event's status, and a note
    that said the status is unknown says where it came from; with no events, null as before."""
    w = Watcher(_rules(tmp_path), _never)
    results = {}
    for name, events in (("known", w), ("none", None)):
        child = subprocess.Popen(["sh", "-c", "read x; exit 7"], stdin=subprocess.PIPE)
        host = Host(None, None, agent=True)
        host.events = events
        assert host.expect(child.pid) is (events is not None)
        c = Contract(
            name, Mode.ATTACH, child.pid, f"ffrtmp-{name}.scope", {}, None, 1, rfc3339(datetime.now(UTC))
        )
        j = Job(c, Store(tmp_path / "state"), Watch(child.pid), logged)
        j.note = "resumed: wrapper PID 1 was gone; exit status unknown"
        if events is not None:
            host.expecting.add(name)
        host.add(j)
        freezing = asyncio.ensure_future(host.finish(j, (None, None), None))
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        w.on_events(
            [Exit(child.pid, child.returncode, None, 5)]
        )  # as the connector says it, before the pidfd
        results[name] = await freezing
        assert name not in host.expecting and not host.jobs
    known, none = results["known"], results["none"]
    assert known is not None and none is not None
    assert (known.exit_code, known.signal, known.platform_sla_reason) == (
        7,
        None,
        Reason.WORKLOAD_FAILED_PLATFORM_OK,
    )
    assert known.governance_error == "resumed: wrapper PID 1 was gone; exit status from its exit event"
    assert (none.exit_code, none.platform_sla_reason) == (None, Reason.COMPLETED_WITHIN_LIMITS)
    assert none.governance_error == "resumed: wrapper PID 1 was gone; exit status unknown"
    assert w.exit_status(known.pid) == (None, None)  # forgotten once frozen


# A matched process that ends before its move (the adoption waits for the node-wide lock, here held by
# the test) and whose PID another process then gets (ns_last_pid, in the sandbox's PID namespace): that
# other process is not moved, nothing is left, one line.
GONE = """
import asyncio, subprocess, sys
from pathlib import Path
from ffrtmp_systemd.agent import Host
from ffrtmp_systemd.discover import Watcher, adopt
from ffrtmp_systemd.report.store import Store
from ffrtmp_systemd.rules import load
from ffrtmp_systemd.systemd.bus import Bus

async def main():
    bus = await Bus.connect(broad=True)
    host, store = Host(bus, asyncio.Lock(), agent=True), Store(Path(sys.argv[2]))
    stop = asyncio.get_running_loop().create_future()
    child = subprocess.Popen(["sleep", "311"])
    w = Watcher(load(Path(sys.argv[1])), lambda c: adopt(host, store, c, w.exit_status, stop))
    async with host.lock:
        w.scan()
        assert len(w.tasks) == 1, w.tasks
        await asyncio.sleep(0)  # the adoption runs up to the lock
        child.kill()
        child.wait()  # reaped: the PID is free for anyone, and here it is taken by another process
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(child.pid - 1))
        stranger = subprocess.Popen(["sleep", "312"])
        assert stranger.pid == child.pid, (stranger.pid, child.pid)
    await asyncio.gather(*w.tasks)
    print(Path(f"/proc/{stranger.pid}/cgroup").read_text().strip(), flush=True)
    stranger.kill()

asyncio.run(main())
"""


def test_a_process_that_ends_before_its_move_leaves_nothing(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "w.toml").write_text('[[rule]]\nname = "gone"\nexe = "sleep"\nargv = "^311$"\n')
    r = sandbox.run(["python", "-c", GONE, str(tmp_path / "w.toml"), str(state_dir)], timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "not adopted" in ln]
    assert len(lines) == 1 and lines[0].endswith("has exited"), r.stderr + r.stdout
    assert "ffrtmp.slice" not in r.stdout, r.stdout  # the stranger's cgroups: where it was
    assert not list(state_dir.rglob("*.json")), list(state_dir.rglob("*"))  # no contract, no record
    units = sandbox.systemctl("list-units", "--all", "--plain", "--no-legend", "ffrtmp-*.scope").stdout
    assert units.strip() == ""


async def test_a_newline_or_bytes_that_are_not_utf8_in_exe_or_argv_stay_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can name a directory and pass arguments: the match line in the journal stays one line (a
    newline there would let a user write a line of their own into the agent's log). A rule by name adopts
    a user's own program of that name; a rule by path does not."""
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/x\nffrtmp: job forged\xff"))
    odd.mkdir()
    shutil.copy("/bin/sh", odd / "ffmpeg")  # a user's own program, named ffmpeg
    (tmp_path / "w.toml").write_text('[[rule]]\nname = "odd"\nexe = "ffmpeg"\nargv = \' a\\nb\'\n')
    handed: list[Candidate] = []

    async def hook(c: Candidate) -> None:
        handed.append(c)

    p = subprocess.Popen([os.fsencode(odd / "ffmpeg"), b"-c", b"sleep 60; :", b"a\nb\xfe"])
    try:
        w = Watcher(load(tmp_path / "w.toml"), hook)
        with caplog.at_level(logging.INFO, logger="ffrtmp_systemd.discover"):
            c = w.consider(p.pid)
            await asyncio.gather(*w.tasks)
        system = os.path.realpath(
            "/bin/sh"
        )  # the same program, but the system's file: by path, not this copy
        (tmp_path / "p.toml").write_text(f'[[rule]]\nname = "path"\nexe = "{system}"\n')
        assert facts(p.pid, load(tmp_path / "p.toml")) is None
    finally:
        p.kill()
        p.wait()
    assert c is not None and handed == [c] and c.process.argv[1:] == ("-c", "sleep 60; :", "a\nb\udcfe")
    (line,) = [r.getMessage() for r in caplog.records if "matched" in r.getMessage()]
    assert "\n" not in line and "\\nffrtmp: job forged\\xff/ffmpeg" in line, line
