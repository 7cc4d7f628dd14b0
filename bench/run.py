"""Benchmarks of ffrtmp side by side with `systemd-run --scope`, written to bench/RESULTS.md. Measuring ONLY.

    python3 bench/run.py            # the whole benchmark, a few minutes
    python3 bench/run.py --quick    # small counts: shows that the script still works

Command timings are hyperfine's (its JSON export); the rest reuses the tests' helpers. Where PID 1 is
not systemd it boots the test sandbox (tests/sandbox.py) and runs itself inside it (`--inside`), so
that every PID handed to systemd is the same process for systemd and for us.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers and sandbox; bench/ is not a package
import sandbox  # noqa: E402
from helpers import children, free_port, get, read_until, wait_for, wakeups  # noqa: E402

VENV = REPO / ".venv" / "bin"
PYTHON = str(VENV / "python") if (VENV / "python").exists() else sys.executable
SDRUN = "systemd-run --scope -q"
DEVNULL = subprocess.DEVNULL


@dataclass(frozen=True)
class Plan:
    runs: int  # timed runs of each command
    attaches: int  # attaches behind the latency percentiles
    concurrent: int  # workloads started at once
    idle_s: float  # window in which a waiting wrapper's context switches are counted
    results: int  # result files the exporter serves
    scrapes: int


FULL = Plan(runs=15, attaches=50, concurrent=100, idle_s=10.0, results=100_000, scrapes=20)
QUICK = Plan(runs=1, attaches=3, concurrent=5, idle_s=1.0, results=200, scrapes=2)


@dataclass
class Bench:
    plan: Plan
    ffrtmp: str
    tmp: Path
    rows: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seq: int = 0

    def row(self, cells: str, holds: bool | None) -> None:
        """A row of the table: `figure | ours | reference | target`, and whether the target holds."""
        self.rows.append(f"| {cells} | {'—' if holds is None else ('yes' if holds else '**no**')} |")

    def job(self, kind: str) -> str:
        self.seq += 1
        return f"bench-{kind}-{self.seq}"

    def hyperfine(self, *cmds: str, runs: int = 0) -> list[dict[str, float]]:
        """hyperfine's result for each command (no shell; one warm-up, then its runs one after another)."""
        out = self.tmp / "hyperfine.json"
        opts = f"-N --style none --warmup 1 --runs {runs or self.plan.runs} --export-json {out}"
        subprocess.run(["hyperfine", *opts.split(), *cmds], check=True, stdout=DEVNULL)
        return list(json.loads(out.read_text())["results"])


def ms(seconds: float) -> str:
    x = seconds * 1000
    return f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def cpu(r: dict[str, float]) -> float:
    return r["user"] + r["system"]


def to_exec(cmd: str) -> float:
    """Seconds from just before the invocation of `CMD date +%s%N` to the exec of `date` (its clock)."""
    t = time.time_ns()
    out = subprocess.run(
        [*cmd.split(), "date", "+%s%N"], capture_output=True, text=True, check=True, timeout=60
    )
    return (int(out.stdout.split()[-1]) - t) / 1e9


def pss(pid: int) -> float:
    """MiB, from smaps_rollup."""
    line = next(
        ln for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines() if ln.startswith("Pss:")
    )
    return int(line.split()[1]) / 1024


@contextlib.contextmanager
def waiting(cmd: str) -> Iterator[int]:
    """`CMD run -- sleep 600` started and waiting (its workload in its scope); yields the wrapper's PID."""
    p = subprocess.Popen([*cmd.split(), "run", "--", "sleep", "600"], stdin=DEVNULL, stderr=subprocess.PIPE)
    try:
        line = read_until(p, "ffrtmp: job ")[-1]
        if "started in" not in line:
            raise RuntimeError(f"the wrapper is not governed: {line}")
        time.sleep(0.5)  # let start-up garbage and page faults settle before reading memory
        yield p.pid
    finally:
        for kid in wait_for(lambda: children(p.pid)):
            os.kill(kid, signal.SIGKILL)  # the workload: the wrapper then freezes its result and exits
        p.wait(timeout=30)


def fig_run(b: Bench) -> None:
    ours, ref = b.hyperfine(f"{b.ffrtmp} run -- true", f"{SDRUN} true")
    r = ours["median"] / ref["median"]
    b.row(f"wall time of `ffrtmp run -- true` (scope, exec, wait, frozen record) | {ms(ours['median'])} | "
          f"{ms(ref['median'])} (`{SDRUN} true`); ratio **{r:.1f}** | ratio ≤ 8", r <= 8)  # fmt: skip
    b.row(f"CPU time (user+sys) of that process, workload included | {ms(cpu(ours))} | {ms(cpu(ref))}; "
          f"ratio {cpu(ours) / cpu(ref):.1f} | —", None)  # fmt: skip


def fig_exec(b: Bench) -> None:
    pairs = [(to_exec(f"{b.ffrtmp} run --"), to_exec(SDRUN)) for _ in range(b.plan.runs + 1)][1:]
    x, y = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    b.row(f"time from invocation to the workload's exec | {ms(x)} | {ms(y)} (`systemd-run --scope`); "
          f"ratio **{x / y:.1f}** | ratio ≤ 8", x / y <= 8)  # fmt: skip


def fig_memory(b: Bench) -> None:
    with waiting(b.ffrtmp) as pid:
        ours, before = pss(pid), sum(wakeups(pid).values())
        time.sleep(b.plan.idle_s)
        idle = sum(wakeups(pid).values()) - before
        for _ in range(20):
            subprocess.run([*SDRUN.split(), "true"], check=True)
        busy = sum(wakeups(pid).values()) - before - idle
    p = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"], stdin=DEVNULL)
    time.sleep(0.5)
    ref = pss(p.pid)
    p.kill()
    p.wait()
    b.row(f"resident cost of a waiting `ffrtmp run -- sleep 600` (PSS, smaps_rollup) | {ours:.1f} MiB | "
          f"{ref:.1f} MiB bare `python3 -c` sleeping | ≤ 15 MiB", ours <= 15)  # fmt: skip
    b.row(f"wakeups of a waiting wrapper over {b.plan.idle_s:g} s (context switches, all threads) | {idle} | "
          "— | 0 (no polling)", idle == 0)  # fmt: skip
    b.row(f"wakeups of a waiting wrapper while 20 other scopes start and end | {busy} | — | "
          "0 (hears its own unit only)", busy == 0)  # fmt: skip


def attach_once(b: Bench) -> float:
    """Seconds from invoking `ffrtmp attach` on a fresh `sleep` to the record's attach_time (scope `done`)."""
    victim = subprocess.Popen(["sleep", "600"], stdin=DEVNULL)
    job, t = b.job("attach"), time.time_ns()
    p = subprocess.Popen([*b.ffrtmp.split(), "attach", "--pid", str(victim.pid), "--job-id", job],
                         stdin=DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        read_until(p, "adopted into")
    finally:
        victim.kill()
        victim.wait()
        p.wait(timeout=30)
    record = json.loads((b.tmp / "state" / "results" / f"{job}.json").read_text())
    done = datetime.strptime(record["attach_time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return done.timestamp() - t / 1e9


async def calls(b: Bench, pause: float) -> list[float]:
    """StartTransientUnit -> JobRemoved `done` through the product's own client, on a fresh connection
    each (as a real attach), `pause` s after connecting; the first is a warm-up."""
    from ffrtmp_systemd.systemd.bus import Bus

    out = []
    for _ in range(b.plan.attaches + 1):
        victim, job = subprocess.Popen(["sleep", "600"], stdin=DEVNULL), b.job("call")
        props = [("PIDs", "au", [victim.pid]), ("Slice", "s", "ffrtmp.slice"), ("AddRef", "b", True),
                 ("CollectMode", "s", "inactive-or-failed"), ("Description", "s", job)]  # fmt: skip
        bus = await Bus.connect()
        await asyncio.sleep(pause)
        try:
            t = time.perf_counter()
            await bus.start_scope(f"ffrtmp-{job}.scope", props)
            out.append(time.perf_counter() - t)
        finally:
            bus.close()
            victim.kill()
            victim.wait()
    return out[1:]


def fig_attach(b: Bench) -> None:
    xs = [attach_once(b) for _ in range(b.plan.attaches)]
    ys = [to_exec(SDRUN) for _ in range(b.plan.attaches)]
    paused, warm = asyncio.run(calls(b, 0.2)), asyncio.run(calls(b, 0.0))
    x50, x99, c50, c99 = pct(xs, 50), pct(xs, 99), pct(paused, 50), pct(paused, 99)
    b.row(f"attach, invocation of `ffrtmp attach` → scope `done`, p50 / p99 over {len(xs)} | {ms(x50)} / "
          f"{ms(x99)} | {ms(pct(ys, 50))} / {ms(pct(ys, 99))} (`systemd-run --scope` invocation → exec) | "
          "p50 ≤ 15 ms, p99 ≤ 50 ms", x50 <= 0.015 and x99 <= 0.05)  # fmt: skip
    b.row(f"attach, StartTransientUnit call → JobRemoved `done`, p50 / p99 over {len(paused)} | {ms(c50)} / "
          f"{ms(c99)} (back to back, no pause: {ms(pct(warm, 50))} / {ms(pct(warm, 99))}) | the call "
          "`systemd-run --scope` makes (its whole start is the row above) | p50 ≤ 15 ms, p99 ≤ 50 ms",
          c50 <= 0.015 and c99 <= 0.05)  # fmt: skip


def fig_concurrent(b: Bench) -> None:
    n, each = b.plan.concurrent, f"xargs -a {b.tmp / 'n'} -P {b.plan.concurrent} -I{{}}"
    runs = -(-b.plan.runs // 5)  # 3 for the whole benchmark, 1 for --quick
    ours, ref = b.hyperfine(f"{each} {b.ffrtmp} run -- sleep 1", f"{each} {SDRUN} sleep 1", runs=runs)
    r = ours["median"] / ref["median"]
    b.row(f"{n} concurrent `ffrtmp run -- sleep 1`, total wall | {ms(ours['median'])} | "
          f"{ms(ref['median'])} ({n} concurrent `systemd-run --scope sleep 1`); ratio **{r:.1f}** | "
          "ratio ≤ 3", r <= 3)  # fmt: skip


def fill_results(results: Path, n: int, sample: Path) -> None:
    """`n` records made from a real one; every tenth a violation (oom_killed)."""
    record = json.loads(sample.read_text())
    ok = json.dumps(record, sort_keys=True, indent=2).replace(record["job_id"], "@JOB@")
    record.update(platform_sla_compliant=False, platform_sla_reason="oom_killed", oom_killed=True)
    bad = json.dumps(record, sort_keys=True, indent=2).replace(record["job_id"], "@JOB@")
    results.mkdir(parents=True)
    for i in range(n):
        path = results / f"bench-{i:06d}.json"
        path.write_text((bad if i % 10 == 0 else ok).replace("@JOB@", path.stem) + "\n")
        path.chmod(0o444)


def fig_exporter(b: Bench) -> None:
    subprocess.run([*b.ffrtmp.split(), "run", "--job-id", b.job("sample"), "--", "true"], check=True)
    n, state = b.plan.results, b.tmp / "exporter"
    fill_results(state / "results", n, next((b.tmp / "state" / "results").glob("*.json")))
    url, t = f"http://127.0.0.1:{free_port()}", time.perf_counter()
    p = subprocess.Popen([*b.ffrtmp.split(), "exporter", "--listen", url[7:], "--state-dir", str(state)],
                         stdin=DEVNULL, stderr=DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: p.poll() is not None or up(url), timeout=600, what="the exporter", every=0.05)
        ready = time.perf_counter() - t
        m = re.search(r'^ffrtmp_jobs_total\{state="completed"\} (\S+)$', get(url + "/metrics", 60)[2], re.M)
        if m is None or float(m[1]) != n:
            raise RuntimeError(f"/metrics does not count {n} completed jobs: {m}")
        times = []
        for _ in range(b.plan.scrapes):
            t = time.perf_counter()
            get(url + "/metrics", 60)
            times.append(time.perf_counter() - t)
        rss = int(re.findall(r"VmRSS:\s+(\d+)", Path(f"/proc/{p.pid}/status").read_text())[0]) / 1024
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    p50 = statistics.median(times)
    b.row(f"exporter `/metrics` with {n:,} result files: scrape p50, exporter RSS | {ms(p50)} (p99 "
          f"{ms(pct(times, 99))}), RSS {rss:.1f} MiB | — (ready to serve {ready:.1f} s after start) | "
          "≤ 50 ms, ≤ 60 MiB", p50 <= 0.05 and rss <= 60)  # fmt: skip


def up(url: str) -> bool:
    with contextlib.suppress(OSError):
        return get(url + "/healthz")[0] == 200
    return False


FLOORS = {
    "nothing (the interpreter)": "pass",
    "typer": "import typer",
    "asyncio and dbus_next": "import asyncio, dbus_next.aio.message_bus",
    "everything `run` imports": "import ffrtmp_systemd.cli, ffrtmp_systemd.wrapper.run",
}


def fig_where(b: Bench) -> None:
    """Where a `run -- true` spends its time: the interpreter, imports, the CLI framework."""
    floors = b.hyperfine(*(f"{PYTHON} -c '{code}'" for code in FLOORS.values()))
    shown = "; ".join(f"{name}: {ms(cpu(r))}" for name, r in zip(FLOORS, floors, strict=True))
    b.notes.append(
        f"CPU time (user+sys, hyperfine) of a process that only imports (each alone: they share "
        f"the standard library, so they do not add up): {shown}."
    )
    cmd = [PYTHON, "-X", "importtime", "-m", "ffrtmp_systemd", "run", "--", "true"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    by: dict[str, float] = defaultdict(float)
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            self_us, _, name = line[len("import time:") :].split("|")
            by[name.strip().split(".")[0]] += int(self_us) / 1e6
    top = ", ".join(f"{k} {v * 1000:.0f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:12])
    b.notes.append(
        f"Imports during one `python -X importtime -m ffrtmp_systemd run -- true`: "
        f"{ms(sum(by.values()))} in all; self time by top-level package, ms: {top}."
    )
    lean = f"{PYTHON} {REPO / 'bench' / 'lean_run.py'}"
    full, bare = b.hyperfine(f"{b.ffrtmp} run -- true", f"{lean} run -- true")
    with waiting(b.ffrtmp) as pid:
        full_pss = pss(pid)
    with waiting(lean) as pid:
        lean_pss = pss(pid)
    b.notes.append(
        f"The CLI framework: `ffrtmp run -- true` against `bench/lean_run.py run -- true` (the same "
        f"`wrapper.run`, logging and summary line, no typer): wall {ms(full['median'])} vs "
        f"{ms(bare['median'])}, CPU {ms(cpu(full))} vs {ms(cpu(bare))}; PSS of a waiting one "
        f"{full_pss:.1f} vs {lean_pss:.1f} MiB."
    )


FIGURES: dict[str, Callable[[Bench], None]] = {
    "run": fig_run, "exec": fig_exec, "memory": fig_memory, "attach": fig_attach,
    "concurrent": fig_concurrent, "exporter": fig_exporter, "where": fig_where,
}  # fmt: skip

METHOD = """\
## Method

- Command timings (`ffrtmp run -- true`, the concurrent runs, the import floors, the lean wrapper):
  hyperfine without a shell (`-N`), one warm-up, then its runs of each command one after the other
  (ours first), both in the same run; wall is hyperfine's median, CPU its mean user+sys time of the
  process and what it reaped (systemd's and dbus-daemon's own work is in neither).
- Time to exec: the workload is `date +%s%N`; the realtime clock it prints minus the one read just
  before the invocation; ours and the reference alternate, medians.
- Memory: PSS from `/proc/PID/smaps_rollup` of the wrapper 0.5 s after its `started in` line, the
  workload running; the reference is `python -c 'import time; time.sleep(600)'`, same interpreter.
- Wakeups: voluntary and involuntary context switches over all threads of a waiting wrapper
  (`/proc/PID/task/*/status`), over the window, then while 20 `systemd-run --scope -q true` run.
- Attach, invocation → `done`: the record's `attach_time` (read right after the start job's
  `JobRemoved` `done`) minus the realtime clock read before invoking `ffrtmp attach --pid` of a fresh
  `sleep`; the reference is `systemd-run --scope` invocation → exec, as above.
- Attach, call → `done`: the product's own client (`Bus.start_scope`, a fresh connection each)
  adopts a fresh `sleep` with `attach`'s properties, 0.2 s after connecting (after an idle spell a
  cgroup v1 move waits for an RCU grace period), and back to back.
- Concurrent: `xargs -P N` starting N commands at once, timed by hyperfine until the last exits;
  any non-zero exit fails the figure.
- Exporter: result files copied from a real record (every tenth an `oom_killed` violation), the
  exporter on a free loopback port; after a first scrape that must count every file, the scrapes are
  timed one after the other; RSS is `VmRSS` after them.
- Bytecode: the package's modules are compiled (`compileall`) before anything is timed. These
  machines set `PYTHONDONTWRITEBYTECODE=1`, under which the `.venv`'s editable install would compile
  them again on every call (about 15 ms of CPU); an installed package has its bytecode.
"""


VERSIONS = """import platform, importlib.metadata as m
names = ("dbus-next", "typer", "prometheus-client")
print(platform.python_version(), *(f"{n} {m.version(n)}," for n in names))"""

REPORT = """# Benchmarks: ffrtmp next to `systemd-run --scope`

Written by `{cmd}` at {started:%Y-%m-%d %H:%M UTC} in {seconds:.0f} s; {runs} timed runs per command.
Regenerate with the same command.

## Machine

| | |
|---|---|
| CPU | {model}, {cores} cores |
| memory | {mem:.1f} GiB |
| kernel | {kernel} |
| systemd | {systemd} ({where}) |
| Python | {python} ({PYTHON}) |
| libraries | {libraries} {hyperfine} |
| load average (1, 5, 15 min) | {load} at the start, {load_end} at the end |

## Figures

| figure | ffrtmp | reference in the same run | target | holds |
|---|---|---|---|---|
{rows}

## Where the time goes

{notes}

"""


def report(b: Bench, where: str, started: datetime, seconds: float, load: str, cmd: str) -> str:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()

    python, libraries = out(PYTHON, "-c", VERSIONS).split(" ", 1)
    return REPORT.format(
        cmd=cmd, started=started, seconds=seconds, runs=b.plan.runs, where=where, PYTHON=PYTHON,
        model=re.findall(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())[0], cores=os.cpu_count(),
        mem=int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2, kernel=platform.release(),
        systemd=out("systemctl", "--version").splitlines()[0], python=python, libraries=libraries,
        hyperfine=out("hyperfine", "--version"), load=load, load_end=loadavg(),
        rows="\n".join(b.rows), notes="\n".join(f"- {n}" for n in b.notes),
    ) + METHOD  # fmt: skip


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def inside(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="ffrtmp-bench.", dir="/var/tmp"))
    os.environ["FFRTMP_STATE_DIR"] = str(tmp / "state")
    (tmp / "n").write_text("x\n" * plan.concurrent)  # one line per concurrent command, for xargs
    b = Bench(plan, args.ffrtmp or str(VENV / "ffrtmp"), tmp)
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "ffrtmp_systemd")], check=True)  # Method
    started, t, load, failed = datetime.now(UTC), time.monotonic(), loadavg(), False
    try:
        for name in args.only.split(",") if args.only else FIGURES:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                FIGURES[name](b)
            except Exception as err:  # the figure is void, the others still count
                failed = True
                b.row(f"{name} | failed: {err!r}"[:300] + " | — | —", False)
        cmd = "python3 bench/run.py" + (" --quick" if args.quick else "")
        text = report(b, args.where, started, time.monotonic() - t, load, cmd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(text)
    print(text)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small counts")
    ap.add_argument("--only", default="", help=f"comma-separated figures: {','.join(FIGURES)}")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"), help="the Markdown to write")
    ap.add_argument("--ffrtmp", default="", help="command to measure instead of .venv/bin/ffrtmp")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--where", default="host systemd", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inside or Path("/proc/1/comm").read_text().strip() == "systemd":
        return inside(args)
    where = "sandbox booted by tests/sandbox.py: PID 1 of this machine is not systemd"
    own = [PYTHON, str(Path(__file__).resolve()), *argv, "--out", str(Path(args.out).resolve())]
    return sandbox.main(["run", "--", *own, "--inside", "--where", where])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
