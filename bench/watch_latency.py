"""Latency from a process's exec to its governance by a watch rule (issue 13), written as a section of
bench/RESULTS.md (the rest of the file is left as it is). Measuring ONLY.

    python3 bench/watch_latency.py               # this host's, then the VM's (a boot: ~2 minutes)
    python3 bench/watch_latency.py --part host   # only this host's (prints the section, writes nothing)
    python3 bench/watch_latency.py --part vm     # only the VM's (prints the section, writes nothing)

Exec → governed, as a user sees it: from the kernel's exec event of the process (its timestamp, on
CLOCK_MONOTONIC) to the `ActiveEnterTimestampMonotonic` of the scope it was adopted into (what
`systemctl show -p ActiveEnterTimestamp ffrtmp-JOB.scope` shows: systemd has the process in the scope's
cgroup, with the rule's limits). For each place, N matching processes started at once (one shell forks
them) and N one after another (each started once the one before is governed); p50/p99 nearest-rank.

- **VM** (tests/vm.py: Debian 12, systemd 252 as PID 1, cgroup v2, under QEMU TCG: EMULATED, ~50-200x
  slower than this host): the installed agent (units/ with a drop-in `ExecStart=` of the image's venv,
  `FFRTMP_WATCH_RULES=`) adopts by its rules; the benchmark listens to the same process events for
  the exec timestamps.
- **This host** (root in the initial namespaces: the connector works; PID 1 is not systemd): exec → the
  adoption hook (the rule matched: /proc read, the rules tried), the real `Watcher` with a hook that only
  notes the time. Exec → governed needs a systemd, and the one we can boot here (tests/sandbox.py) lives
  in its own PID namespace, where the kernel refuses the connector. So the benchmark listens here and
  relays each exec event of the sandbox's PID namespace (its PID there, the kernel's timestamp) on a
  pipe to `ffrtmp watch`'s own code (discover.watch) running inside the sandbox, with only its event
  source swapped for that pipe: everything after the event is the product's, against a real systemd
  252 on this host's kernel; the relay's own hop is measured (exec → heard) and included.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ONCE, SEQ = "3006", "3007"  # the `sleep` arguments the two rules match: started at once, one by one
RULES = f"""[[rule]]
name = "once"
exe = "sleep"
argv = '^{ONCE}$'
cpu-weight = 50
memory-max = "64M"

[[rule]]
name = "seq"
exe = "sleep"
argv = '^{SEQ}$'
cpu-weight = 50
memory-max = "64M"
"""
BEGIN, END = "<!-- watch latency (bench/watch_latency.py): begin -->", "<!-- watch latency: end -->"


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def unit_of_pid(pid: int) -> str:
    """The last component of the process's cgroup path (its scope), '' if gone."""
    try:
        return Path(f"/proc/{pid}/cgroup").read_text().strip().splitlines()[-1].rsplit("/", 1)[-1]
    except (OSError, IndexError):
        return ""


def governed(pid: int) -> bool:
    try:
        return "/ffrtmp.slice/" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def cpu_ms(pid: int) -> float:
    """User+system CPU time a process has used so far (ms, in clock ticks); 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def cpu_use(who: dict[str, int], before: dict[str, float]) -> dict[str, float]:
    """CPU ms each of `who` (name -> PID) used since `before` (name -> ms)."""
    return {name: cpu_ms(pid) - before.get(name, 0.0) for name, pid in who.items()}


def active_enter(show: str) -> dict[str, int]:
    """Unit -> ActiveEnterTimestampMonotonic (µs), from `systemctl show -p Id -p` that property."""
    out: dict[str, int] = {}
    for block in show.strip().split("\n\n"):
        kv = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if kv.get("Id") and kv.get("ActiveEnterTimestampMonotonic", "0") != "0":
            out[kv["Id"]] = int(kv["ActiveEnterTimestampMonotonic"])
    return out


# -- inside the VM: the installed agent adopts, we time it --------------------------------------------
GUEST_SH = r"""#!/bin/sh
# The agent installed from units/ (as the README's steps do, with the image's venv in a drop-in), with
# watch rules; then the benchmark in a scope of its own (a rule without `unit` never adopts from a
# .service, and this script runs in the VM's runner service).
set -u
install -m 0644 units/ffrtmp-agent.service units/ffrtmp.socket units/ffrtmp.slice /etc/systemd/system/
install -d /etc/ffrtmp /etc/systemd/system/ffrtmp-agent.service.d
cat > /etc/ffrtmp/watch.toml <<'EOF'
@RULES@EOF
chmod 0644 /etc/ffrtmp/watch.toml
printf '[Service]\nExecStart=\nExecStart=%s\nEnvironment=FFRTMP_WATCH_RULES=%s\n' \
  '/opt/ffrtmp/venv/bin/ffrtmp agent' /etc/ffrtmp/watch.toml \
  > /etc/systemd/system/ffrtmp-agent.service.d/bench.conf
systemd-tmpfiles --create "$PWD/units/tmpfiles.d/ffrtmp.conf"
systemctl daemon-reload
systemctl start ffrtmp-agent.service || { systemctl status --no-pager ffrtmp-agent.service; exit 3; }
i=0
echo "bench: agent started"
until journalctl -b -u ffrtmp-agent.service -o cat | grep -q 'watching by'; do
  i=$((i + 1)); [ $i -gt 600 ] && { journalctl -b -u ffrtmp-agent.service -o cat; exit 4; }; sleep 0.5
done
echo "bench: agent watching"
systemd-run --quiet --scope --unit=bench-watch python3 bench/watch_latency.py --guest "$OUT" --n @N@
rc=$?
echo "bench: exit $rc"; ls -l "$OUT"
journalctl -b -u ffrtmp-agent.service -o json --no-pager > "$OUT/agent.journal.json"
exit $rc
"""


def guest(out: Path, n: int) -> int:
    """In the VM, with the installed agent watching: N at once, then N one by one; what we saw to out/."""
    from ffrtmp_systemd.procevents import Exec, ProcEvents

    pe = ProcEvents()  # before any spawn: every exec seen
    execs: dict[int, int] = {}

    def drain() -> None:
        for e in pe.read():
            if isinstance(e, Exec):
                execs[e.pid] = e.at_ns

    def wait_governed(pids: list[int], every: float, limit: float) -> None:
        end = time.monotonic() + limit
        while not all(governed(p) for p in pids):
            drain()
            if time.monotonic() > end:  # not adopted (the agent's journal says why): counted as missing
                print(
                    f"not governed in {limit:.0f} s: {[p for p in pids if not governed(p)]}", file=sys.stderr
                )
                break
            time.sleep(every)
        drain()

    def main_pid(unit: str) -> int:
        out = subprocess.run(
            ["systemctl", "show", "-p", "MainPID", "--value", unit], capture_output=True, text=True
        )
        return int(out.stdout.strip() or 0)

    who = {"agent": main_pid("ffrtmp-agent.service"), "systemd": 1, "dbus-daemon": main_pid("dbus.service")}
    load0 = os.getloadavg()
    t0 = time.monotonic()
    cpu, t = cpu_use(who, {}), time.monotonic()
    script = f"for i in $(seq {n}); do sleep {ONCE} >/dev/null 2>&1 & echo $!; done; exec >&-; wait"
    sh = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    assert sh.stdout is not None
    once = [int(sh.stdout.readline()) for _ in range(n)]
    wait_governed(once, 0.5, 600)  # light: the times are systemd's, not this loop's
    used = {"once": cpu_use(who, cpu)}
    used["once"]["wall"] = (time.monotonic() - t) * 1000
    cpu, t = cpu_use(who, {}), time.monotonic()
    seq: list[int] = []
    procs = []
    for _ in range(n):
        p = subprocess.Popen(["sleep", SEQ], stdout=subprocess.DEVNULL)
        procs.append(p)
        seq.append(p.pid)
        wait_governed([p.pid], 0.05, 60)
    used["seq"] = cpu_use(who, cpu)
    used["seq"]["wall"] = (time.monotonic() - t) * 1000
    seconds = time.monotonic() - t0
    units = {p: unit_of_pid(p) for p in once + seq}
    props = ["-p", "Id", "-p", "ActiveEnterTimestampMonotonic"]
    show = subprocess.run(["systemctl", "show", *props, *sorted(set(units.values()))],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    active = active_enter(show)
    for pid in once + seq:
        os.kill(pid, 9)
    sh.wait()
    for q in procs:
        q.wait()
    facts = {
        "kernel": platform.release(),
        "systemd": subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split(
            "\n"
        )[0],
        "cpus": os.cpu_count(),
        "cpu": re.findall(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())[0],
        "python": platform.python_version(),
        "load": [load0, os.getloadavg()],
        "seconds": seconds,
    }
    rows = [
        {"phase": "once" if p in once else "seq", "pid": p, "exec_ns": execs.get(p), "unit": units[p],
         "active_us": active.get(units[p])}
        for p in once + seq
    ]  # fmt: skip
    (out / "watch-latency.json").write_text(json.dumps({"facts": facts, "rows": rows, "cpu": used}, indent=1))
    return 0


def vm_part(n: int) -> dict[str, Any]:
    """Boot the VM, run GUEST_SH; the guest's rows joined with the agent's own lines from its journal."""
    sys.path.insert(0, str(REPO / "tests"))
    from vm import VM, Script

    text = GUEST_SH.replace("@RULES@", RULES).replace("@N@", str(n))
    t = time.monotonic()
    with VM() as vm:  # its files are gone once it is closed: read them in here
        boot = vm.boot([Script("bench", text)], timeout=1800)
        r = boot["bench"]
        got, journal = r.files / "watch-latency.json", r.files / "agent.journal.json"
        if r.status != 0 or not got.exists():
            tail = "\n".join(boot.console.splitlines()[-15:])
            raise RuntimeError(f"VM part: exit {r.status}: {r.stdout[-1500:]} {r.stderr[-1500:]} {tail}")
        data = json.loads(got.read_text())
        said = journal.read_text().splitlines() if journal.exists() else []
    matched: dict[int, int] = {}  # PID -> when the journal received the agent's `rule R matched` line (µs)
    governed_ms: dict[int, float] = {}  # PID -> the agent's own `governed N ms after its exec`
    for line in said:
        with_ts = json.loads(line)
        msg, at = str(with_ts.get("MESSAGE", "")), int(with_ts.get("__MONOTONIC_TIMESTAMP", 0))
        if m := re.search(r"rule \w+ matched PID (\d+) ", msg):
            matched[int(m[1])] = at
        elif m := re.search(r"job \w+-(\d+)-\d+ governed ([0-9.]+) ms after its exec", msg):
            governed_ms[int(m[1])] = float(m[2])
    for row in data["rows"]:
        row["matched_us"], row["agent_ms"] = matched.get(row["pid"]), governed_ms.get(row["pid"])
    data["facts"]["boot_seconds"] = boot.seconds
    data["facts"]["agent_lines"] = len(said)
    data["facts"]["wall"] = time.monotonic() - t
    return dict(data)


# -- this host: exec -> the adoption hook ------------------------------------------------------------
def nonce_rules(dirpath: Path) -> tuple[Path, str, str]:
    """RULES with `sleep` arguments no one else runs (3006.NONCE): the rules file, the two arguments."""
    nonce = f"{os.getpid()}{time.monotonic_ns() % 10**6}"
    once, seq = f"{ONCE}.{nonce}", f"{SEQ}.{nonce}"
    path = dirpath / f"ffrtmp-bench-watch-{nonce}.toml"
    path.write_text(
        RULES.replace(f"^{ONCE}$", f"^{re.escape(once)}$").replace(f"^{SEQ}$", f"^{re.escape(seq)}$")
    )
    path.chmod(0o644)
    return path, once, seq


def spawn_line(n: int, arg: str) -> list[str]:
    """A shell that forks `n` sleeps at once and says their PIDs."""
    script = f"for i in $(seq {n}); do sleep {arg} >/dev/null 2>&1 & echo $!; done"
    return ["sh", "-c", script]


async def host_hook(n: int) -> dict[str, Any]:
    """The real connector and Watcher here, with an adoption hook that only notes when it was called."""
    import asyncio

    from ffrtmp_systemd.discover import Candidate, Watcher
    from ffrtmp_systemd.procevents import ProcEvents
    from ffrtmp_systemd.rules import load

    path, once, seq = nonce_rules(Path("/var/tmp"))
    try:
        rules = load(path)
    finally:
        path.unlink()
    hooked: dict[int, tuple[str, int, int | None]] = {}  # PID -> (rule, hook time, exec time)
    arrived = asyncio.Event()

    async def hook(c: Candidate) -> None:
        hooked[c.process.pid] = (c.rule.name, time.monotonic_ns(), c.exec_ns)
        arrived.set()

    async def until(pids: list[int]) -> None:
        async def all_in() -> None:
            while not all(p in hooked for p in pids):
                arrived.clear()
                await arrived.wait()

        await asyncio.wait_for(all_in(), 120)

    source = ProcEvents()
    w = Watcher(rules, hook, source)
    source.listen(asyncio.get_running_loop(), w.on_events)
    pids: list[int] = []
    try:
        out = await asyncio.to_thread(subprocess.run, spawn_line(n, once), capture_output=True, text=True)
        at_once = [int(p) for p in out.stdout.split()]
        pids += at_once
        await until(at_once)
        for _ in range(n):  # one after another: each started once the one before reached the hook
            out = await asyncio.to_thread(subprocess.run, spawn_line(1, seq), capture_output=True, text=True)
            pids.append(int(out.stdout))
            await until(pids[-1:])
    finally:
        source.close()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    rows = [{"phase": rule, "pid": p, "exec_ns": ex, "hook_ns": at} for p, (rule, at, ex) in hooked.items()]
    return {"rows": rows}


# -- this host's kernel, the sandbox's systemd: exec -> governed, the events relayed -------------------
def adopter(rules_path: str, state: str, lock: str = "lock") -> int:
    """Inside the sandbox: `ffrtmp watch`'s own code (discover.watch) with its event source swapped for
    the host's exec events relayed on stdin (`PID NS` lines: PID in this namespace, the kernel's
    timestamp). Says `heard PID NS NOW` for each, then the product's own log lines, on stdout.
    `lock` = `nolock`: an EXPERIMENT, not the product: its node-wide attach lock swapped for one that
    never waits, to see what the lock costs when many start at once."""
    import asyncio
    import logging

    from ffrtmp_systemd import discover
    from ffrtmp_systemd.procevents import Event, Exec
    from ffrtmp_systemd.report.store import Store
    from ffrtmp_systemd.rules import load

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    class Relay:
        def __init__(self) -> None:
            os.set_blocking(0, False)
            self.buf, self.loop = b"", None  # type: tuple[bytes, asyncio.AbstractEventLoop | None]

        def fileno(self) -> int:
            return 0

        def read(self) -> list[Event]:
            try:
                data = os.read(0, 65536)
            except BlockingIOError:
                return []
            now = time.monotonic_ns()
            if not data:
                self.close()
                return []
            *lines, self.buf = (self.buf + data).split(b"\n")
            out: list[Event] = []
            for line in lines:
                pid, ns = map(int, line.split())
                print(f"heard {pid} {ns} {now}", flush=True)
                out.append(Exec(pid, ns))
            return out

        def listen(self, loop: asyncio.AbstractEventLoop, callback: Callable[[list[Event]], None]) -> None:
            self.loop = loop
            loop.add_reader(0, lambda: callback(self.read()))

        def close(self) -> None:
            if self.loop is not None:
                self.loop.remove_reader(0)
                self.loop = None

    setattr(discover, "ProcEvents", Relay)  # noqa: B010 (the one thing swapped)
    if lock == "nolock":

        class NoLock:
            async def __aenter__(self) -> None:
                return None

            async def __aexit__(self, *exc: object) -> None:
                return None

        from ffrtmp_systemd.agent import Host

        class Unlocked(Host):
            def __init__(self, bus: Any, _lock: Any, agent: bool) -> None:
                super().__init__(bus, NoLock(), agent)  # type: ignore[arg-type]

        setattr(discover, "Host", Unlocked)  # noqa: B010
    return discover.watch(load(Path(rules_path)), Store(Path(state)))


def sandbox_part(n: int, lock: str = "lock") -> dict[str, Any]:
    """Exec -> governed against the sandbox's systemd, N at once then (with the lock) N one by one."""
    import threading

    sys.path.insert(0, str(REPO / "tests"))
    from sandbox import Sandbox

    from ffrtmp_systemd.names import unit_name
    from ffrtmp_systemd.procevents import Exec, Lost, ProcEvents

    python = str(REPO / ".venv" / "bin" / "python")
    lines: list[str] = []
    cond = threading.Condition()
    sb = Sandbox()
    stop_r, stop_w = os.pipe()
    relay: threading.Thread | None = None
    adopt = launcher = None
    lost = [0]
    try:
        path, once, seq = nonce_rules(sb.dir)
        state = sb.dir / "watch-state"
        for sub in ("jobs", "results"):
            (state / sub).mkdir(parents=True)
        pe = ProcEvents()
        ns = os.readlink(f"/proc/{sb.pid}/ns/pid")
        adopt = sb.spawn([python, str(Path(__file__).resolve()), "--adopter", str(path), str(state), lock],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        assert adopt.stdin is not None and adopt.stdout is not None
        to_adopter, from_adopter = adopt.stdin, adopt.stdout

        def forward() -> None:  # the host's connector -> the adopter: exec events of the sandbox's namespace
            import select

            while True:
                ready, _, _ = select.select([pe.fileno(), stop_r], [], [])
                if stop_r in ready:
                    return
                said = b""
                for e in pe.read():
                    if isinstance(e, Lost):
                        lost[0] += 1
                    if not isinstance(e, Exec):
                        continue
                    try:
                        if os.readlink(f"/proc/{e.pid}/ns/pid") != ns:
                            continue
                        status = Path(f"/proc/{e.pid}/status").read_text()
                    except OSError:
                        continue
                    inner = next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()[-1]
                    said += f"{inner} {e.at_ns}\n".encode()
                if said:
                    to_adopter.write(said)
                    to_adopter.flush()

        def collect() -> None:
            for raw in from_adopter:
                with cond:
                    lines.append(raw.decode(errors="replace").rstrip("\n"))
                    cond.notify_all()

        relay = threading.Thread(target=forward, daemon=True)
        relay.start()
        threading.Thread(target=collect, daemon=True).start()

        def wait_line(pattern: str, limit: float = 300) -> re.Match[str]:
            end = time.monotonic() + limit
            with cond:
                while True:
                    for ln in lines:
                        if m := re.search(pattern, ln):
                            return m
                    if (adopt is not None and adopt.poll() is not None) or time.monotonic() > end:
                        raise RuntimeError(f"sandbox part: no {pattern!r}: {lines[-20:]}")
                    cond.wait(1)

        wait_line("listening to process events")
        script = (
            "while read n a; do i=0; while [ $i -lt $n ]; do "
            "sleep $a >/dev/null 2>&1 & echo $!; i=$((i+1)); done; done"
        )
        launcher = sb.spawn(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert launcher.stdin is not None and launcher.stdout is not None

        def start(k: int, arg: str) -> list[int]:
            assert launcher is not None and launcher.stdin is not None and launcher.stdout is not None
            launcher.stdin.write(f"{k} {arg}\n".encode())
            launcher.stdin.flush()
            return [int(launcher.stdout.readline()) for _ in range(k)]

        dbus = int(sb.systemctl("show", "-p", "MainPID", "--value", "dbus.service").stdout or 0)
        who = {"watch": sb.inner_pid(adopt)[0], "systemd": sb.pid, "dbus-daemon": sb.host_pid(dbus)}
        phase: dict[int, str] = {}
        cpu, t = cpu_use(who, {}), time.monotonic()
        for p in start(n, once):
            phase[p] = "once"
        for p in phase:
            wait_line(rf"job once-{p}-\d+ governed ")
        used = {"once": cpu_use(who, cpu)}
        used["once"]["wall"] = (time.monotonic() - t) * 1000
        cpu, t = cpu_use(who, {}), time.monotonic()
        for _ in range(n if lock == "lock" else 0):
            (p,) = start(1, seq)
            phase[p] = "seq"
            wait_line(rf"job seq-{p}-\d+ governed ")
        if lock == "lock":
            used["seq"] = cpu_use(who, cpu)
            used["seq"]["wall"] = (time.monotonic() - t) * 1000
        with cond:
            said = list(lines)
        jobs = {int(m[2]): (m[1], float(m[3])) for ln in said
                if (m := re.search(r"job ((?:once|seq)-(\d+)-\d+) governed ([0-9.]+) ms", ln))}  # fmt: skip
        heard = {
            int(m[1]): (int(m[2]), int(m[3]))
            for ln in said
            if (m := re.match(r"heard (\d+) (\d+) (\d+)$", ln))
        }
        units = {p: unit_name(jobs[p][0]) for p in phase}
        show = sb.systemctl("show", "-p", "Id", "-p", "ActiveEnterTimestampMonotonic", *units.values()).stdout
        active = active_enter(show)
        sb.run(["kill", "-KILL", *map(str, phase)])
        rows = [
            {"phase": phase[p], "pid": p, "exec_ns": heard[p][0], "heard_ns": heard[p][1],
             "active_us": active.get(units[p]), "agent_ms": jobs[p][1]}
            for p in phase
        ]  # fmt: skip
        version = sb.systemctl("--version").stdout.split("\n")[0]
        return {"rows": rows, "lost": lost[0], "systemd": version, "cpu": used}
    finally:
        os.write(stop_w, b"x")
        if relay is not None:
            relay.join(10)
        for proc in (adopt, launcher):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        sb.close()
        for proc in (adopt, launcher):
            if proc is not None:
                proc.wait()


# -- the section ---------------------------------------------------------------------------------------
def summary(xs: list[float]) -> str:
    return f"{pct(xs, 50):.1f} / {pct(xs, 99):.1f}" if xs else "—"


def ms_between(rs: list[dict[str, Any]], a: str, b: str) -> list[float]:
    """b - a in ms over the rows that have both (`*_us`: µs, `*_ns`: ns, both CLOCK_MONOTONIC)."""

    def ns(r: dict[str, Any], k: str) -> int:
        return int(r[k]) * (1000 if k.endswith("_us") else 1)

    return [(ns(r, b) - ns(r, a)) / 1e6 for r in rs if r.get(a) and r.get(b)]


PHASES = (("once", "{n} at once"), ("seq", "{n} one after another"))


def serial_note(where: str, rs: list[dict[str, Any]]) -> tuple[str, float]:
    """When the scopes of N processes started at once became active: first, last, the step between (and
    that step's p50)."""
    act = sorted(int(r["active_us"]) for r in rs if r.get("active_us"))
    first = min(int(r["exec_ns"]) for r in rs if r.get("exec_ns"))
    last = max(int(r["exec_ns"]) for r in rs if r.get("exec_ns"))
    gaps = [(b - a) / 1000 for a, b in itertools.pairwise(act)]
    return (
        f"{where}, {len(rs)} at once: the execs spanned {(last - first) / 1e6:.1f} ms; "
        f"the first scope was active {(act[0] * 1000 - first) / 1e6:.1f} ms after the first exec, the last "
        f"{(act[-1] * 1000 - first) / 1e6:.1f} ms after it; from one scope's activation to the next "
        f"{pct(gaps, 50):.1f} ms (p50), {max(gaps):.1f} ms at most: the scopes came one after another.",
        pct(gaps, 50),
    )


# (part, where, [(figure, start, end)]): the rows of the table, by place
FIGS = [
    ("hook", "this host (connector, `Watcher`)", [
        ("exec → the adoption hook (rule matched)", "exec_ns", "hook_ns"),
    ]),
    ("sandbox", "this host's kernel, sandbox systemd (events relayed)", [
        ("**exec → governed** (scope active)", "exec_ns", "active_us"),
        ("exec → `watch` says `governed N ms after its exec`", "exec_ns", "agent_ms"),
        ("exec → the relayed event heard inside the sandbox", "exec_ns", "heard_ns"),
    ]),
    ("nolock", "as above, the attach lock swapped for none (an experiment, not the product)", [
        ("**exec → governed** (scope active)", "exec_ns", "active_us"),
    ]),
    ("vm", "VM, **emulated** (QEMU TCG)", [
        ("**exec → governed** (scope active)", "exec_ns", "active_us"),
        ("exec → the agent says `governed N ms after its exec`", "exec_ns", "agent_ms"),
        ("exec → the agent's `rule R matched` line received by the journal", "exec_ns", "matched_us"),
    ]),
]  # fmt: skip


NAMES = {
    "hook": "This host",
    "sandbox": "Sandbox",
    "nolock": "Sandbox, no attach lock (experiment)",
    "vm": "VM",
}


def table(got: dict[str, Any], n: int) -> tuple[list[str], list[str], dict[str, float]]:
    """The table's rows, the notes, and the figures the analysis needs (`PART_PHASE_END_Q`)."""
    rows, notes, keep = [], [], {}
    for part, where, figs in FIGS:
        for phase, label in PHASES:
            if part not in got:
                continue
            rs = [r for r in got[part]["rows"] if r["phase"] == phase]
            if not rs:
                continue
            for figure, start, end in figs:
                if end == "agent_ms":  # the product's own figure, already exec -> then
                    xs = [float(r["agent_ms"]) for r in rs if r.get("agent_ms") is not None]
                else:
                    xs = ms_between(rs, start, end)
                if xs:
                    keep[f"{part}_{phase}_{end}_50"], keep[f"{part}_{phase}_{end}_99"] = (
                        pct(xs, 50),
                        pct(xs, 99),
                    )
                count = f"{len(xs)}" if len(xs) == len(rs) else f"{len(xs)} of {len(rs)}"
                rows.append(f"| {figure}, {label.format(n=n)} | {where} | {count} | {summary(xs)} |")
            if phase == "once" and part != "hook" and rs:
                note, keep[f"{part}_step"] = serial_note(NAMES[part], rs)
                notes.append(note)
        for phase, label in PHASES:
            use = got.get(part, {}).get("cpu", {}).get(phase)
            if use:
                busy = {k: v for k, v in use.items() if k != "wall"}
                keep[f"{part}_{phase}_cpu"] = sum(busy.values()) / n
                keep[f"{part}_{phase}_wall"] = use["wall"]
                notes.append(
                    f"{NAMES[part]}: CPU (user+system) while {label.format(n=n)} were "
                    f"adopted ({use['wall']:.0f} ms of wall): "
                    + ", ".join(f"{k} {v:.0f} ms" for k, v in busy.items())
                    + f"; {sum(busy.values()) / n:.1f} ms per adoption in all."
                )
    return rows, notes, keep


SECTION = """{begin}
## Watch: exec → governed (issue 13)

Written by `{cmd}` at {started:%Y-%m-%d %H:%M UTC} in {seconds:.0f} s (all figures of this section from
that one run; the rest of this file is `bench/run.py`'s and was not regenerated). Regenerate with the
same command (`--part host` or `--part vm` prints one part's figures without writing). Not part of the
CI run.

**Exec → governed**: from the kernel's exec event of the process (its timestamp, CLOCK_MONOTONIC) to
the `ActiveEnterTimestamp` of the scope a watch rule adopted it into (`systemctl show -p
ActiveEnterTimestamp ffrtmp-JOB.scope`: systemd has moved the process into the scope's cgroup with the
rule's limits, `cpu-weight = 50`, `memory-max = "64M"`). Each place: {n} matching `sleep`s forked at
once by one shell, then {n} one after another (each started once the one before is governed).
Milliseconds, nearest-rank percentiles{p99note}. Every figure moves with this machine's load (2 shared
cores; the load averages are below), the VM's most: its emulated CPUs are threads on those same cores.

| figure | where | n | p50 / p99 (ms) |
|---|---|---|---|
{rows}

- This host: {host}; load average (1, 5, 15 min) {load0} at the start, {load1} at the end (2 cores,
  shared with other sessions' test runs).
- VM: {vm}
{notes}

**What dominates.**
{analysis}

**How.**
- *This host, exec → adoption hook*: the kernel's process-events connector (root in the initial PID
  and user namespaces: it works here) and the agent's own `Watcher`, with an adoption hook that only
  notes `CLOCK_MONOTONIC`: the event read, `/proc/PID/{{exe,cmdline,status,cgroup,stat}}` read, the
  rules tried, the hook's task started. The adoption (scope) is not in this figure.
- *This host, exec → governed*: here PID 1 is not systemd; the only systemd we can boot
  (`tests/sandbox.py`) runs in its own PID namespace, and the kernel gives process events only to a
  listener in the initial PID namespace (inside the sandbox `ffrtmp watch` refuses, as the README
  says). So the benchmark listens on the host and relays every exec event of the sandbox's PID
  namespace (the PID as the sandbox numbers it, from `NSpid`, and the kernel's timestamp) through a
  pipe to `ffrtmp watch`'s own code (`discover.watch`, the rules, `govern.adopt`, the node-wide attach
  lock, one bus connection) running inside the sandbox, its event source swapped for that pipe. The
  relay's hop is in the figure (row "relayed event heard"); the sandbox's systemd is 252, as Debian 12's,
  on this machine's hybrid cgroups (v1 controllers: the limits go to v1 files, not to v2's).
- *The lock's share*: the sandbox part once more, {n} at once only, with the watch process's attach
  lock swapped for one that never waits (an experiment: the product always takes it).
- *CPU*: user+system time (`/proc/PID/stat`, in 10 ms ticks) of the watch process (the agent in the
  VM), systemd (the sandbox's or the VM's PID 1) and dbus-daemon, read before and after each phase.
- *Code*: the host figures run the checkout's package in a long-lived process (the `Watcher` here,
  `discover.watch` in the sandbox), so bytecode or not changes only their start, which is not timed;
  in the VM the agent runs the checkout that `tests/vm.py` brings in with its bytecode compiled.
- *VM*: `tests/vm.py` boots Debian 12 (systemd 252 as PID 1, cgroup v2) under QEMU **TCG** (no KVM
  here: every instruction emulated, ~50-200x slower than this host), installs `units/` with a
  drop-in (`ExecStart=` the image's venv, `FFRTMP_WATCH_RULES=`), starts `ffrtmp-agent.service`, and
  runs the benchmark in a scope of its own; it listens to the same process events for the exec
  timestamps. The agent's own lines come from its journal (`__MONOTONIC_TIMESTAMP`: when journald
  received the line, so an upper bound of when it was said).
{end}
"""


def analysis(k: dict[str, float], n: int, got: dict[str, Any]) -> str:
    """What dominates, from this run's figures `k` (see table())."""

    def f(key: str) -> str:
        return f"{k[key]:.1f} ms" if key in k else "—"

    def top(use: dict[str, float]) -> str:
        return max((v, name) for name, v in use.items() if name != "wall")[1]

    out = []
    if "sandbox_seq_active_us_50" in k:
        out.append(
            f"- **One adoption alone** (one after another), this host's kernel with the sandbox's systemd: "
            f"governed {f('sandbox_seq_active_us_50')} after the exec (p50). Of that, the decision "
            f"(exec → the adoption hook, here without the relay) is {f('hook_seq_hook_ns_50')} and the "
            f"relay's hop {f('sandbox_seq_heard_ns_50')}; the rest is the adoption up to systemd's start "
            f"job: the process pinned (pidfd), the node-wide attach lock taken, `GetUnitByPID` for it and "
            f"each descendant, the contract written, `StartTransientUnit` with `PIDs=`, and systemd making "
            f"the scope (cgroup, limits, the PID moved)."
        )
    if "sandbox_once_active_us_50" in k:
        out.append(
            f"- **{n} at once**: p50 {f('sandbox_once_active_us_50')}, p99 {f('sandbox_once_active_us_99')}. "
            f"The events are not the queue: every decision was made within {f('hook_once_hook_ns_99')} "
            f"(p99 of exec → hook). The scopes became active one after another, {f('sandbox_step')} apart "
            f"(p50), so the k-th process waits for the k-1 adoptions before it. `govern.adopt` holds the "
            f"node-wide attach lock from `GetUnitByPID` to the start job's `JobRemoved` (of two attaches of "
            f"one process the later must see the first): one move at a time."
        )
    lock_rules = False  # does the experiment show the lock to be most of the queue?
    if "nolock_once_active_us_50" in k and "sandbox_once_active_us_99" in k:
        lock99, free99 = k["sandbox_once_active_us_99"], k["nolock_once_active_us_99"]
        lock_rules = free99 < lock99 / 2
        out.append(
            f"- **The lock's share**, by experiment (not the product: without the lock two attaches of one "
            f"process could both move it): the same {n} at once with the lock swapped for one that never "
            f"waits: p50 {f('nolock_once_active_us_50')}, p99 {f('nolock_once_active_us_99')} (with it: "
            f"{f('sandbox_once_active_us_50')}, {f('sandbox_once_active_us_99')}), {f('nolock_step')} "
            f"between activations (p50). "
            + (
                "Most of the queue is the lock's."
                if lock_rules
                else "So the lock is not what dominates here: without it the adoptions still queue, for "
                "the CPU (below) and at systemd, which runs one start job after another."
            )
        )

    def cpu(part: str) -> str:
        """The CPU the {n} at once cost, process by process, against the wall time they took."""
        use = got[part]["cpu"]["once"]
        busy = {name: v for name, v in use.items() if name != "wall"}
        each = ", ".join(f"{name} {v / n:.1f}" for name, v in sorted(busy.items(), key=lambda kv: -kv[1]))
        return (
            f"{sum(busy.values()) / n:.1f} ms of CPU per adoption ({each}); the {n} together "
            f"{sum(busy.values()):.0f} ms of CPU in {use['wall']:.0f} ms of wall"
        )

    if "sandbox_once_cpu" in k:
        out.append(
            f"- **CPU**, {n} at once in the sandbox: {cpu('sandbox')}, on 2 cores shared with the "
            f"machine's other work (the load averages above). An adoption's work is a chain (the watch "
            f"process, dbus-daemon, systemd, and back)"
            + (
                "; the lock keeps these chains from overlapping."
                if lock_rules
                else f"; the CPU each costs and the share of the cores the machine's load leaves are what "
                f"the {n}-at-once figure is made of."
            )
        )
    if "vm_once_active_us_50" in k and "vm_seq_active_us_50" in k:
        out.append(
            f"- **VM (emulated, TCG)**: one alone {f('vm_seq_active_us_50')} (p50), {n} at once p50 "
            f"{f('vm_once_active_us_50')}, p99 {f('vm_once_active_us_99')}, {f('vm_step')} from one "
            f"activation to the next (p50). The same make-up, every part of it on an emulated CPU: "
            + (cpu("vm") if "vm_once_cpu" in k else "")
            + f". Even the decisions are slow there (the agent's `rule R matched` lines of the {n} at once "
            f"reached the journal {f('vm_once_matched_us_50')} after the exec, p50). Not a real host's "
            f"figures."
        )
    if "sandbox_seq_agent_ms_50" in k:
        out.append(
            f"- The product's own line `governed N ms after its exec` ({f('sandbox_seq_agent_ms_50')} one "
            f"alone, p50) comes later than the scope's activation: it is said once `govern.adopt` has "
            f"returned, after the lock is let go, the contract marked governed (its fsyncs) and the unit "
            f"followed (its bus calls); systemd's `ActiveEnterTimestamp` is when the process is governed."
        )
    return "\n".join(out) or "- (nothing measured)"


def section_of(path: Path) -> str:
    """This benchmark's section of `path` ("" if none), for bench/run.py to keep when it rewrites the file."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        return "\n" + old[old.index(BEGIN) : old.index(END) + len(END)] + "\n"
    return ""


def write_section(out: Path, text: str) -> None:
    old = out.read_text() if out.exists() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    out.write_text(new if new.endswith("\n") else new + "\n")


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str]) -> int:
    import asyncio
    from datetime import UTC, datetime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--part", choices=("all", "host", "vm"), default="all")
    ap.add_argument("--n", type=int, default=50, help="processes at once, and one after another")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"), help="the Markdown to update")
    ap.add_argument("--raw", default="", help="also write the raw figures (JSON) here")
    ap.add_argument("--guest", default="", help=argparse.SUPPRESS)
    ap.add_argument("--adopter", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.guest:
        return guest(Path(args.guest), args.n)
    if args.adopter:
        return adopter(*args.adopter)
    venv = REPO / ".venv" / "bin" / "python"
    if venv.exists() and Path(sys.prefix) != venv.parent.parent:  # the package and its dependencies
        os.execv(venv, [str(venv), str(Path(__file__).resolve()), *argv])

    def stop(sig: int, _frame: object) -> None:  # unwind (the sandbox and the VM are torn down), then exit
        raise KeyboardInterrupt(sig)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    started, t, load0 = datetime.now(UTC), time.monotonic(), loadavg()
    got: dict[str, Any] = {}
    failed = []
    parts: dict[str, Callable[[], dict[str, Any]]] = {
        "hook": lambda: asyncio.run(host_hook(args.n)),
        "sandbox": lambda: sandbox_part(args.n),
        "nolock": lambda: sandbox_part(args.n, "nolock"),
        "vm": lambda: vm_part(args.n),
    }
    for name, run in parts.items():
        if args.part == "all" or (args.part == "vm") == (name == "vm"):
            print(f"watch_latency: {name} ...", file=sys.stderr, flush=True)
            try:
                got[name] = run()
            except Exception as err:
                failed.append(f"{name}: {err!r}")
                print(f"watch_latency: {name} failed: {err!r}", file=sys.stderr, flush=True)
    load1 = loadavg()
    if args.raw:
        Path(args.raw).write_text(json.dumps(got, indent=1))
    rows, notes, keep = table(got, args.n)
    vm = got.get("vm", {}).get("facts")
    init = Path("/proc/1/comm").read_text().strip()
    cmd = "python3 bench/watch_latency.py" + (f" --n {args.n}" if args.n != 50 else "")
    text = SECTION.format(
        begin=BEGIN, end=END, cmd=cmd, started=started, seconds=time.monotonic() - t, n=args.n,
        rows="\n".join(rows), load0=load0, load1=load1,
        host=f"kernel {platform.release()}, {os.cpu_count()} cores, PID 1 `{init}`; "
        f"sandbox {got.get('sandbox', {}).get('systemd', '(not run)')}",
        vm=(f"QEMU TCG, {vm['cpus']} vCPUs ({vm['cpu']}), kernel {vm['kernel']}, {vm['systemd']}, "
            f"Python {vm['python']}; load in the guest {vm['load'][0][0]:.1f} at the start, "
            f"{vm['load'][1][0]:.1f} at the end; the boot took {vm['boot_seconds']:.0f} s in all")
        if vm else "(not run)",
        notes="\n".join(f"- {x}" for x in notes + [f"**failed**: {f}" for f in failed]),
        analysis=analysis(keep, args.n, got),
        p99note=f" (of {args.n}, the p99 is the largest)" if args.n <= 100 else "",
    )  # fmt: skip
    print(text)
    if args.part == "all":
        write_section(Path(args.out), text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
