"""Benchmarks of ffrtmp side by side with `systemd-run --scope`, written to bench/RESULTS.md. Measuring ONLY.

    .venv/bin/python bench/run.py          # the whole benchmark, several minutes
    .venv/bin/python bench/run.py --quick  # small counts: shows that the script still works

Issue 11's figures in both modes of one run: the installed mode (`systemctl start ffrtmp.socket`: the
agent, started by its socket, governs every job; `ffrtmp run`/`attach` are its thin clients) and the
fallback (FFRTMP_AGENT_SOCKET=none: each client governs in-process), each against `systemd-run --scope`
in the same run. What is timed is an installed copy of the package with its bytecode (see Method).
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
import contextlib
import fcntl
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
import tomllib
from collections import Counter, defaultdict
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
AGENT_SOCKET, AGENT_SERVICE = "ffrtmp.socket", "ffrtmp-agent.service"
MODES = ("agent", "fallback")
SAYS = {"agent": "agent", "fallback": "in-process"}  # the start line's `(pid N, SAYS)`


@dataclass(frozen=True)
class Plan:
    runs: int  # timed runs of each command
    attaches: int  # attaches behind the latency percentiles
    concurrent: int  # workloads started at once
    live: int  # live jobs the agent holds for its memory figure
    batches: tuple[int, int]  # batches of jobs, jobs in each, through one agent: what it holds after each
    idle_s: float  # window in which a waiting process's context switches are counted
    results: int  # result files the exporter serves
    scrapes: int


FULL = Plan(runs=15, attaches=50, concurrent=100, live=1000, idle_s=10.0, results=100_000, scrapes=20,
            batches=(5, 200))  # fmt: skip
QUICK = Plan(runs=1, attaches=3, concurrent=5, live=5, idle_s=1.0, results=200, scrapes=2, batches=(2, 8))


@dataclass
class Bench:
    plan: Plan
    ffrtmp: str  # the installed copy's console script
    tmp: Path
    mode: str = "fallback"
    rows: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seq: int = 0
    got: dict[str, dict[str, float]] = field(default_factory=dict)  # figures by mode, for the analysis

    def keep(self, **values: float) -> None:
        self.got.setdefault(self.mode, {}).update(values)

    def row(self, cells: str, holds: bool | None) -> None:
        """A row: `figure | ours | reference | target`, then the mode, whether it holds, the load."""
        figure, rest = cells.split(" | ", 1)
        verdict = "—" if holds is None else ("yes" if holds else "**no**")
        self.rows.append(f"| {figure} | {self.mode} | {rest} | {verdict} | {os.getloadavg()[0]:.1f} |")

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


def target(b: Bench, holds: bool, text: str) -> tuple[str, bool | None]:
    """(target cell, verdict) of a target of the installed mode: the fallback's figure is only shown."""
    return (text, holds) if b.mode == "agent" else (f"— (agent: {text})", None)


def to_exec(cmd: str) -> float:
    """Seconds from just before the invocation of `CMD date +%s%N` to the exec of `date` (its clock)."""
    t = time.time_ns()
    out = subprocess.run(
        [*cmd.split(), "date", "+%s%N"], capture_output=True, text=True, check=True, timeout=60
    )
    return (int(out.stdout.split()[-1]) - t) / 1e9


def uss(pid: int) -> float:
    """Private memory (USS) in MiB: the Private_* lines of smaps_rollup."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return sum(int(m) for m in re.findall(r"^Private_\w+:\s+(\d+) kB", text, re.M)) / 1024


def cpu_s(pid: int) -> float:
    """User+system CPU seconds a process has used so far (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_cpu(b: Bench) -> float:
    """The agent's CPU seconds so far (0 in the fallback: there is none)."""
    return cpu_s(agent_pid()) if b.mode == "agent" else 0.0


def switches(pid: int) -> int:
    return sum(wakeups(pid).values())


@contextlib.contextmanager
def waiting(cmd: str) -> Iterator[int]:
    """`CMD run -- sleep 600` started and waiting (its workload in its scope); yields the client's PID."""
    p = subprocess.Popen([*cmd.split(), "run", "--", "sleep", "600"], stdin=DEVNULL, stderr=subprocess.PIPE)
    try:
        line = read_until(p, "ffrtmp: job ")[-1]
        if "started in" not in line:
            raise RuntimeError(f"the job is not governed: {line}")
        time.sleep(0.5)  # let start-up garbage and page faults settle before reading memory
        yield p.pid
    finally:
        for kid in wait_for(lambda: children(p.pid)):
            os.kill(kid, signal.SIGKILL)  # the workload: the job is then frozen and the client exits
        p.wait(timeout=30)


def fig_run(b: Bench) -> None:
    before = agent_cpu(b)
    ours, ref = b.hyperfine(f"{b.ffrtmp} run -- true", f"{SDRUN} true")
    agent = (agent_cpu(b) - before) / (b.plan.runs + 1)
    r = ours["median"] / ref["median"]
    b.keep(run=ours["median"], run_ref=ref["median"], run_cpu=cpu(ours), run_agent=agent)
    goal = "ratio ≤ 4" if b.mode == "agent" else "ratio ≤ 10"
    b.row(f"wall time of `ffrtmp run -- true` (scope, exec, wait, frozen record) | {ms(ours['median'])} | "
          f"{ms(ref['median'])} (`{SDRUN} true`); ratio **{r:.1f}** | {goal}",
          r <= (4 if b.mode == "agent" else 10))  # fmt: skip
    theirs = f" (the agent's: {ms(agent)} a job)" if b.mode == "agent" else ""
    b.row(f"CPU time (user+sys) of that process, workload included{theirs} | "
          f"{ms(cpu(ours))} | {ms(cpu(ref))}; ratio {cpu(ours) / cpu(ref):.1f} | —", None)  # fmt: skip


def fig_exec(b: Bench) -> None:
    pairs = [(to_exec(f"{b.ffrtmp} run --"), to_exec(SDRUN)) for _ in range(b.plan.runs + 1)][1:]
    x, y = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    b.keep(exec=x, exec_ref=y)
    goal, holds = target(b, x / y <= 4, "ratio ≤ 4")
    b.row(f"time from invocation to the workload's exec | {ms(x)} | {ms(y)} (`systemd-run --scope`); "
          f"ratio **{x / y:.1f}** | {goal}", holds)  # fmt: skip


def fig_waiting(b: Bench) -> None:
    with waiting(b.ffrtmp) as pid:
        ours, before = uss(pid), switches(pid)
        time.sleep(b.plan.idle_s)
        idle = switches(pid) - before
        for _ in range(20):
            subprocess.run([*SDRUN.split(), "true"], check=True)
        busy = switches(pid) - before - idle
    p = subprocess.Popen(["python3", "-c", "import time; time.sleep(600)"], stdin=DEVNULL)
    time.sleep(0.5)
    ref = uss(p.pid)
    b.keep(uss=ours, uss_ref=ref)
    p.kill()
    p.wait()
    goal, holds = target(b, ours <= 4 and idle == 0, "≤ 4 MiB / 0")
    b.row(f"a waiting `ffrtmp run -- sleep 600`: private memory (USS) / wakeups over {b.plan.idle_s:g} "
          f"s | {ours:.1f} MiB / {idle} | {ref:.1f} MiB (`python3 -c` sleeping) | {goal}", holds)  # fmt: skip
    b.row(f"wakeups of that waiting client while 20 other scopes start and end | {busy} | — | "
          "0 (hears its own job only)", busy == 0)  # fmt: skip


def agent_pid() -> int:
    out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", AGENT_SERVICE],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    if int(out) == 0:
        raise RuntimeError(f"{AGENT_SERVICE} is not running")
    return int(out)


def answer_time(*cmd: str) -> float:
    """Seconds until `cmd` answers (it must succeed)."""
    t = time.perf_counter()
    subprocess.run(cmd, stdout=DEVNULL, stderr=DEVNULL, check=True, timeout=60)
    return time.perf_counter() - t


def started(log: Path) -> str:
    """The first line a client said ("" while none)."""
    with contextlib.suppress(OSError):
        return log.read_text().split("\n", 1)[0] if log.stat().st_size else ""
    return ""


def fig_live(b: Bench) -> None:
    """The agent with N live jobs (`ffrtmp run -- flock -s BARRIER true`, held at the barrier)."""
    n, pid = b.plan.live, agent_pid()
    empty = uss(pid)
    logs, barrier = b.tmp / "live", b.tmp / "barrier"
    logs.mkdir()
    barrier.touch()
    procs: list[subprocess.Popen[bytes]] = []
    with barrier.open() as hold:
        fcntl.flock(hold, fcntl.LOCK_EX)
        try:
            t, said = time.monotonic(), [logs / str(i) for i in range(n)]
            for i in range(n):  # all at once
                with said[i].open("wb") as err:
                    limits = ["--memory-max", "64M", "--cpu-weight", "50"]
                    cmd = [
                        b.ffrtmp,
                        "run",
                        "--job-id",
                        f"live-{i}",
                        *limits,
                        "--",
                        "flock",
                        "-s",
                        str(barrier),
                        "true",
                    ]
                    procs.append(subprocess.Popen(cmd, stdin=DEVNULL, stdout=DEVNULL, stderr=err))
            wait_for(lambda: all(map(started, said)), timeout=900, what="every start line", every=0.5)
            ramp = time.monotonic() - t
            bad = Counter(re.sub(r"\d+", "N", ln) for ln in map(started, said) if " started in " not in ln)
            time.sleep(1)  # let the last replies settle
            held, before = uss(pid), switches(pid)
            time.sleep(b.plan.idle_s)
            idle = switches(pid) - before
            busctl, ctl = answer_time("busctl", "--system", "list"), answer_time("systemctl", "list-units")
        finally:
            fcntl.flock(hold, fcntl.LOCK_UN)
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=300)
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    after = uss(pid)
    codes = Counter(p.returncode for p in procs)
    ok = n - sum(bad.values())
    b.row(f"the agent with {n:,} live jobs ({ok:,} governed): private memory (USS) / wakeups over "
          f"{b.plan.idle_s:g} s idle | {held:.1f} MiB / {idle} | — (empty agent {empty:.1f} MiB; "
          f"{after:.1f} MiB after the jobs ended) | ≤ 40 MiB / 0, all governed, all exit 0",
          held <= 40 and idle == 0 and not bad and codes[0] == n)  # fmt: skip
    b.notes.append(
        f"{n:,} live jobs through the agent, started at once: all had said their start line "
        f"{ramp:.1f} s after the first client was spawned ({n / ramp:.0f} jobs/s), {ok:,} of them governed"
        + "".join(f"; {k} × {why!r}" for why, k in bad.most_common(3))
        + f"; with all of them live `busctl --system list` answered in {ms(busctl)} and `systemctl "
        f"list-units` in {ms(ctl)}; the agent grew by {(held - empty) * 1024 / n:.1f} KiB per live job; "
        f"exit statuses of the clients: {dict(codes)}."
    )


def holds(pid: int) -> tuple[float, int, int]:
    """A process's private memory (USS, MiB), descriptors and threads."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M)[1])  # type: ignore[index]
    return uss(pid), len(os.listdir(f"/proc/{pid}/fd")), threads


def metrics_url() -> str:
    """The agent's /metrics (its unit's FFRTMP_EXPORTER_LISTEN, else the default)."""
    out = subprocess.run(["systemctl", "show", "-p", "Environment", "--value", AGENT_SERVICE],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    m = re.search(r"FFRTMP_EXPORTER_LISTEN=(\S+)", out)
    return f"http://{m[1] if m else '127.0.0.1:9464'}/metrics"


def fig_batches(b: Bench) -> None:
    """Batches of jobs through one agent (3 in 4 `run -- true`, 1 in 4 an attach of a `sleep 3`, 25 at a
    time), /metrics scraped after each (it counts their records): what the agent holds after each batch,
    once its jobs ended."""
    (k, n), pid, url, par = b.plan.batches, agent_pid(), metrics_url(), 25
    argv = agent_argv()  # the records in the agent's own state directory (as a node's clients write
    # them by default, /var/lib/ffrtmp) where its unit names one: its exporter counts them at each scrape
    own = argv[argv.index("--state-dir") + 1] if "--state-dir" in argv[:-1] else None
    env = {**os.environ, "FFRTMP_STATE_DIR": own or os.environ["FFRTMP_STATE_DIR"]}
    first, failed = holds(pid), Counter[int]()
    after: list[tuple[float, int, int]] = []
    for _ in range(k):
        procs: list[subprocess.Popen[bytes]] = []
        for i in range(n):
            if len(procs) >= par:
                failed[procs.pop(0).wait(timeout=300)] += 1
            if i % 4 == 3:
                cmd = ["sh", "-c", f'sleep 3 & exec {b.ffrtmp} attach --job-id {b.job("batch")} --pid "$!"']
            else:
                cmd = [b.ffrtmp, "run", "--job-id", b.job("batch"), "--", "true"]
            procs.append(subprocess.Popen(cmd, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL, env=env))
        for p in procs:
            failed[p.wait(timeout=300)] += 1
        get(url)
        time.sleep(1)  # the clients' and the scrape's connections closed by the agent as it reads their end
        after.append(holds(pid))
    usses = " / ".join(f"{u:.1f}" for u, _, _ in after)
    fds, threads = (sorted({x[i] for x in after}) for i in (1, 2))
    grew, ok = after[-1][0] - after[0][0], set(failed) == {0}
    b.keep(batch_uss_first=after[0][0], batch_uss_last=after[-1][0])
    what = f"{n * 3 // 4} `run -- true`, {n // 4} attaches; {par} at a time; /metrics scraped after each"
    b.row(f"the agent after each of {k} batches of {n} jobs ({what}): private memory (USS) / descriptors / "
          f"threads | {usses} MiB / {'/'.join(map(str, fds))} / {'/'.join(map(str, threads))} | — (before "
          f"them {first[0]:.1f} MiB / {first[1]} / {first[2]}; clients' exits {dict(failed)}) | descriptors "
          f"as before them; USS after the last batch within 1 MiB of the first's",
          fds == [first[1]] and grew <= 1 and ok)  # fmt: skip
    b.notes.append(
        f"agent after {k} batches of {n} jobs: USS {usses} MiB after each "
        f"({grew * 1024 / (n * (k - 1)):.2f} KiB a job from the first batch to the last); before them "
        f"{first[0]:.1f} MiB; descriptors {first[1]} before them and {'/'.join(map(str, fds))} after each."
    )


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


def fig_attach(b: Bench) -> None:
    xs = [attach_once(b) for _ in range(b.plan.attaches + 1)][1:]
    ys = [to_exec(SDRUN) for _ in range(b.plan.attaches)]
    x50, x99 = pct(xs, 50), pct(xs, 99)
    b.keep(attach=x50, attach99=x99)
    goal, holds = target(b, x50 <= 0.03 and x99 <= 0.06, "p50 ≤ 30 ms, p99 ≤ 60 ms")
    b.row(f"attach, invocation of `ffrtmp attach` → adopted (the record's `attach_time`), p50 / p99 over "
          f"{len(xs)} | {ms(x50)} / {ms(x99)} | {ms(pct(ys, 50))} / {ms(pct(ys, 99))} (`systemd-run "
          f"--scope` invocation → exec) | {goal}", holds)  # fmt: skip


def fig_concurrent(b: Bench) -> None:
    n, each = b.plan.concurrent, f"xargs -a {b.tmp / 'n'} -P {b.plan.concurrent} -I{{}}"
    runs = -(-b.plan.runs // 5)  # 3 for the whole benchmark, 1 for --quick
    before = agent_cpu(b)
    ours, ref = b.hyperfine(f"{each} {b.ffrtmp} run -- sleep 1", f"{each} {SDRUN} sleep 1", runs=runs)
    r, agent = ours["median"] / ref["median"], (agent_cpu(b) - before) / (runs + 1) / n
    b.keep(many=ours["median"], many_ref=ref["median"], many_cpu=cpu(ours), many_agent=agent, n=n)
    goal, holds = target(b, r <= 1.5, "ratio ≤ 1.5")
    b.notes.append(
        f"{b.mode}: {n} concurrent `ffrtmp run -- sleep 1`: CPU (user+sys) of the clients {ms(cpu(ours))} in "
        f"all, {ms(cpu(ours) / n)} each"
        + (f", and {ms(agent)} of the agent's per job" if agent else "")
        + f"; `systemd-run --scope`: "
        f"{ms(cpu(ref))} in all (2 cores: {n} clients' CPU alone takes {ms(cpu(ours) / 2)} of wall)."
    )
    b.row(f"{n} concurrent `ffrtmp run -- sleep 1`, total wall | {ms(ours['median'])} | "
          f"{ms(ref['median'])} ({n} concurrent `systemd-run --scope sleep 1`); ratio **{r:.1f}** | "
          f"{goal}", holds)  # fmt: skip


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
    b.row(f"standalone `ffrtmp exporter`, `/metrics` with {n:,} result files: scrape p50, RSS | {ms(p50)} "
          f"(p99 {ms(pct(times, 99))}), RSS {rss:.1f} MiB | — (ready to serve {ready:.1f} s after start) | "
          "≤ 50 ms, ≤ 60 MiB", p50 <= 0.05 and rss <= 60)  # fmt: skip


def up(url: str) -> bool:
    with contextlib.suppress(OSError):
        return get(url + "/healthz")[0] == 200
    return False


HEAVY = ("typer", "click", "rich", "asyncio", "dbus_next", "prometheus_client")


def fig_where(b: Bench) -> None:
    """What `ffrtmp run -- true` imports in this mode, and what the interpreter alone costs."""
    python = Path(b.ffrtmp).with_name("python")
    bare, ours = b.hyperfine(f"{python} -c pass", f"{b.ffrtmp} run -- true")
    b.keep(bare=bare["median"], bare_cpu=cpu(bare))
    cmd = [str(python), "-X", "importtime", b.ffrtmp, "run", "--", "true"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    by: dict[str, float] = defaultdict(float)
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            self_us, _, name = line[len("import time:") :].split("|")
            by[name.strip().split(".")[0]] += int(self_us) / 1e6
    top = ", ".join(f"{k} {v * 1000:.1f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:10])
    heavy = [h for h in HEAVY if h in by]
    b.keep(imports=sum(by.values()))
    b.notes.append(
        f"{b.mode}: `ffrtmp run -- true` costs {ms(cpu(ours))} of CPU (wall {ms(ours['median'])}) where the "
        f"interpreter alone (`python -c pass`, same venv) costs {ms(cpu(bare))} (wall {ms(bare['median'])}). "
        f"Its imports (`python -X importtime`): {ms(sum(by.values()))} in all, by top-level package (self, "
        f"ms): {top}; of {', '.join(HEAVY)} it imports {', '.join(heavy) or 'none'}."
    )


FIGURES: dict[str, Callable[[Bench], None]] = {
    "batches": fig_batches, "run": fig_run, "exec": fig_exec, "waiting": fig_waiting, "live": fig_live,
    "attach": fig_attach, "concurrent": fig_concurrent, "where": fig_where, "exporter": fig_exporter,
}  # fmt: skip
AGENT_ONLY = {"live", "batches"}
ONCE = {"exporter"}  # not a matter of the mode: measured in the first mode only

METHOD = """\
## Method

- Modes: **agent** is the installed mode: inside the sandbox `systemctl start {socket}` (as on a host
  set up by the README's install steps), the agent started by its socket on the first call;
  **fallback** is the same commands with `FFRTMP_AGENT_SOCKET=none` (each client governs in-process).
  Before a mode is measured one `ffrtmp run -- true` must say `(pid N, agent)` or `(pid N, in-process)`.
- What is timed: an installed copy with its bytecode. The package is laid out in a fresh venv as pip
  installs a wheel of it (`ffrtmp_systemd/` copied into site-packages with its dist-info, pip's own
  console script with that venv's interpreter; the dependencies from `.venv` through a `.pth`), then
  `compileall`. These machines set `PYTHONDONTWRITEBYTECODE=1`; `.venv`'s editable install would
  also import setuptools' editable finder at every start (8 ms of CPU). The agent's unit is given
  the same copy (a drop-in `ExecStart=`).
- Command timings (`run -- true`, the concurrent runs, `python -c pass`): hyperfine without a shell
  (`-N`), one warm-up, then its runs of each command one after the other (ours first), both in the
  same run; wall is hyperfine's median, CPU its mean user+sys time of the process and what it reaped
  (the agent's, systemd's and dbus-daemon's work is in neither).
- Time to exec: the workload is `date +%s%N`; the realtime clock it prints minus the one read just
  before the invocation; ours and the reference alternate, medians.
- Private memory (USS): the sum of the `Private_*` lines of `/proc/PID/smaps_rollup` of the client
  0.5 s after its `started in` line, the workload running; the reference is `python3 -c
  'import time; time.sleep(600)'`. The agent's: the same of its MainPID, with no job, with N live jobs
  (1 s after the last start line), and after they ended.
- Wakeups: voluntary and involuntary context switches over all threads (`/proc/PID/task/*/status`)
  over the window, then (the client) while 20 `systemd-run --scope -q true` run.
- Live jobs: N `ffrtmp run --memory-max 64M --cpu-weight 50 -- flock -s BARRIER true` started at once
  while the benchmark holds BARRIER exclusively; the row counts the start lines that say `started in`; then
  `busctl --system list` and `systemctl list-units` are timed once, the barrier is let go and every
  client must exit 0.
- Batches: K batches of N jobs through the one agent, 25 clients at a time (3 in 4 `ffrtmp run -- true`,
  1 in 4 `ffrtmp attach` of a `sleep 3`), their records in the agent's own state directory where its unit
  names one; after each batch (every client exited) one `/metrics` scrape, 1 s, then the agent's USS,
  `/proc/PID/fd` entries and threads. What the agent keeps after its jobs end; the figure holds if its
  descriptors are those it had before the batches and its USS grew by at most 1 MiB from the first
  batch to the last.
- Attach, invocation → adopted: the record's `attach_time` (read right after the start job's
  `JobRemoved` `done`) minus the realtime clock read before invoking `ffrtmp attach --pid` of a fresh
  `sleep`; one warm-up; the reference is `systemd-run --scope` invocation → exec, as above.
- Concurrent: `xargs -P N` starting N commands at once, timed by hyperfine until the last exits;
  any non-zero exit fails the figure.
- Exporter: the standalone command (nodes without the agent); result files copied from a real
  record (every tenth an `oom_killed` violation), on a free loopback port; after a first scrape that
  must count every file, the scrapes are timed one after the other; RSS is `VmRSS` after them.
- Load: the last column is the 1-minute load average when the row was written (2 cores, shared).
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

| figure | mode | ffrtmp | reference in the same run | target | holds | load |
|---|---|---|---|---|---|---|
{rows}

## Notes

{notes}

## What stands in the way (from the figures above)

{analysis}

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
        analysis=analysis(b.got.get("agent", {}), b.got.get("fallback", {})),
    ) + METHOD.format(socket=AGENT_SOCKET)  # fmt: skip


def analysis(g: dict[str, float], f: dict[str, float]) -> str:
    """Where the time and memory go, from this run's figures `g` (installed mode) and `f` (fallback); what
    was not measured is skipped."""
    out = []
    with contextlib.suppress(KeyError):
        out.append(
            f"- `run -- true`: {ms(g['run'])} = {ms(g['exec'])} from the invocation to the workload's "
            f"exec + {ms(g['run'] - g['exec'])} from there to the client's exit (the workload ends, the "
            f"client sends Finish, the agent waits for systemd to report the scope inactive and freezes the "
            f"record). The client burns {ms(g['run_cpu'])} of CPU: the interpreter's start alone "
            f"{ms(g['bare_cpu'])} (wall {ms(g['bare'])}), the imports {ms(g['imports'])}; the agent "
            f"{ms(g['run_agent'])} a job. The whole of `systemd-run --scope -q true` is {ms(g['run_ref'])}: "
            f"4x that is {ms(4 * g['run_ref'])}, too little for one Python process's start plus the agent's "
            f"D-Bus work for a job."
        )
    with contextlib.suppress(KeyError):
        out.append(
            f"- A waiting client: {g['uss']:.1f} MiB private where a bare `python3 -c` sleeping is "
            f"{g['uss_ref']:.1f} MiB"
            + (": the target of 4 MiB is below CPython's own floor here" if g["uss_ref"] >= 4 else "")
            + f"; what is ours is {g['uss'] - g['uss_ref']:.1f} MiB (the modules it imports)."
        )
    with contextlib.suppress(KeyError):
        out.append(
            f"- attach → adopted: p50 {ms(g['attach'])}, p99 {ms(g['attach99'])}; like `run`'s "
            f"{ms(g['exec'])} to exec it is mostly the client's start (interpreter, imports) before its one "
            f"call; the p99 is the machine's load (the load column)."
        )
    with contextlib.suppress(KeyError):
        n, cores = int(g["n"]), os.cpu_count() or 1
        out.append(
            f"- {n} concurrent runs: {ms(g['many'])} against {ms(g['many_ref'])}. The clients' CPU is "
            f"{ms(g['many_cpu'])} in all ({ms(g['many_cpu'] / cores)} of wall on {cores} cores) and the "
            f"agent's {ms(g['many_agent'] * n)} on one core; above the 1 s of `sleep` that is CPU, "
            f"not waiting: fewer CPU milliseconds per client and per job in the agent is the way."
        )
    with contextlib.suppress(KeyError):
        out.append(
            f"- Fallback `run -- true`: {ms(f['run'])} against {ms(f['run_ref'])} "
            f"({f['run'] / f['run_ref']:.1f}x; 10x is {ms(10 * f['run_ref'])}): the client burns "
            f"{ms(f['run_cpu'])} of CPU, the imports {ms(f['imports'])} of it (asyncio and dbus-next, and "
            f"what they pull in); then its own bus connection's handshake, Subscribe and the start job."
        )
    return "\n".join(out) or "- (nothing measured in this run)"


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def install(tmp: Path) -> Path:
    """The package laid out as pip installs its wheel, in a fresh venv, with bytecode; its console script."""
    venv = tmp / "venv"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    deps = Path(subprocess.run([PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    site = next((venv / "lib").glob("python3*/site-packages"))
    shutil.copytree(REPO / "ffrtmp_systemd", site / "ffrtmp_systemd", ignore=shutil.ignore_patterns("*.pyc"))
    for info in deps.glob("ffrtmp_systemd-*.dist-info"):
        shutil.copytree(info, site / info.name)
    (site / "deps.pth").write_text(f"{deps}\n")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in scripts:  # pip's console script, as .venv has it, with this venv's interpreter
        text = (VENV / name).read_text().split("\n", 1)[1]
        (venv / "bin" / name).write_text(f"#!{venv / 'bin' / 'python'}\n{text}")
        (venv / "bin" / name).chmod(0o755)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "compileall", "-q", str(site / "ffrtmp_systemd")], check=True)
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "ffrtmp_systemd")], check=True)
    return venv / "bin" / "ffrtmp"


def agent_argv() -> list[str]:
    """The agent unit's command line as it stands (the sandbox's drop-in gives it its own state dir)."""
    out = subprocess.run(["systemctl", "show", "-p", "ExecStart", "--value", AGENT_SERVICE],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    m = re.search(r"argv\[\]=([^;]*) ;", out)
    if m is None:
        raise RuntimeError(f"{AGENT_SERVICE}: no ExecStart ({out.strip()!r})")
    return m[1].split()


def enter(b: Bench, mode: str, sandboxed: bool) -> None:
    """Switch to `mode` and check that `ffrtmp run -- true` says it is governed in that mode. In the
    sandbox the agent's unit is given the installed copy (on a host it is the installed agent)."""
    b.mode = mode
    if mode == "fallback":
        os.environ["FFRTMP_AGENT_SOCKET"] = "none"
    else:
        os.environ.pop("FFRTMP_AGENT_SOCKET", None)
        if sandboxed:  # the sandbox's private /run: gone with it
            dropin = Path("/run/systemd/system.control") / f"{AGENT_SERVICE}.d" / "zz-bench.conf"
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text(f"[Service]\nExecStart=\nExecStart={b.ffrtmp} {' '.join(agent_argv()[1:])}\n")
        for cmd in (["daemon-reload"], ["start", AGENT_SOCKET]):
            r = subprocess.run(["systemctl", *cmd], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"systemctl {' '.join(cmd)}: {r.stderr.strip()}")
    r = subprocess.run([b.ffrtmp, "run", "--", "true"], capture_output=True, text=True, timeout=60)
    said = r.stderr.split("\n", 1)[0]
    if r.returncode != 0 or not re.search(rf"started in \S+ \(pid \d+, {SAYS[mode]}\)$", said):
        raise RuntimeError(f"not the {mode} mode: `ffrtmp run -- true` said {said!r} (exit {r.returncode})")


def inside(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    tmp = Path(tempfile.mkdtemp(prefix="ffrtmp-bench.", dir="/var/tmp"))
    tmp.chmod(0o755)
    os.environ["FFRTMP_STATE_DIR"] = str(tmp / "state")
    (tmp / "n").write_text("x\n" * plan.concurrent)  # one line per concurrent command, for xargs
    b = Bench(plan, args.ffrtmp or str(install(tmp)), tmp)
    started, t, load, failed = datetime.now(UTC), time.monotonic(), loadavg(), False
    names = args.only.split(",") if args.only else list(FIGURES)
    modes = args.modes.split(",")
    try:
        for mode in modes:
            print(f"bench: {mode} mode ...", file=sys.stderr, flush=True)
            try:
                enter(b, mode, args.inside)
            except Exception as err:
                failed = True
                b.mode = mode
                b.row(f"{mode} mode | failed: {err!r}"[:400] + " | — | —", False)
                continue
            for name in names:
                if (name in AGENT_ONLY and mode != "agent") or (name in ONCE and mode != modes[0]):
                    continue
                print(f"bench: {mode}: {name} ...", file=sys.stderr, flush=True)
                try:
                    FIGURES[name](b)
                except Exception as err:  # the figure is void, the others still count
                    failed = True
                    b.row(f"{name} | failed: {err!r}"[:400] + " | — | —", False)
        cmd = ".venv/bin/python bench/run.py" + (" --quick" if args.quick else "")
        text = report(b, args.where, started, time.monotonic() - t, load, cmd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from watch_latency import section_of  # bench/watch_latency.py's own section stays as it was

    Path(args.out).write_text(text + section_of(Path(args.out)))
    print(text)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small counts")
    ap.add_argument("--only", default="", help=f"comma-separated figures: {','.join(FIGURES)}")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: agent,fallback")
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"), help="the Markdown to write")
    ap.add_argument("--ffrtmp", default="", help="command to measure instead of an installed copy")
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
