"""A flood of exec events against watch's dispatch: N short processes started as fast as four shells can,
with the real process-events connector (root, the host's initial namespaces), a Watcher and rules as the
agent has them. Measures how long its event loop is held (a 5 ms heartbeat's worst lateness), the
watcher's CPU time, its memory, and events lost. The adoption hook only counts: nothing is governed, no
systemd is touched. Measuring ONLY.

    .venv/bin/python bench/flood.py [N]      # N processes per case, default 5000 (the backlog: 3000)
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ffrtmp_systemd.discover import Candidate, Watcher
from ffrtmp_systemd.procevents import Event, Exec, Lost, ProcEvents
from ffrtmp_systemd.rules import load

# (case, rule's exe and argv): what each exec costs the watcher grows down this list
CASES = [
    ("no rule wants the executable", 'exe = "never-run-here"'),
    ("by name, argv does not match", "exe = \"ffmpeg\"\nargv = '-listen 1'"),
    ("every one matches (hook only)", 'exe = "ffmpeg"'),
]


async def one(rule: str, n: int, work: Path) -> str:
    (work / "w.toml").write_text(f'[[rule]]\nname = "r"\n{rule}\n')
    rules = load(work / "w.toml")
    matched = 0

    async def hook(c: Candidate) -> None:
        nonlocal matched
        matched += 1

    source = ProcEvents()
    w = Watcher(rules, hook, source)
    lost, events = 0, 0

    def on_events(batch: list[Event]) -> None:
        nonlocal lost, events
        events += len(batch)
        lost += sum(isinstance(e, Lost) for e in batch)
        w.on_events(batch)

    loop = asyncio.get_running_loop()
    late = 0.0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal late
        while not done.is_set():
            t = loop.time()
            await asyncio.sleep(0.005)
            late = max(late, loop.time() - t - 0.005)

    script = f'i=0; while [ $i -lt {n // 4} ]; do "{work}/ffmpeg" x; i=$((i+1)); done'
    tracemalloc.start()
    cpu0 = time.process_time()
    source.listen(loop, on_events)
    beat = asyncio.ensure_future(heartbeat())
    start = time.monotonic()
    shells = [await asyncio.create_subprocess_exec("sh", "-c", script) for _ in range(4)]
    for s in shells:
        await s.wait()
    await asyncio.sleep(0.2)  # the last events
    wall = time.monotonic() - start
    done.set()
    await beat
    cpu = time.process_time() - cpu0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    source.close()
    await asyncio.gather(*w.tasks)
    return (
        f"{events} events in {wall:.1f} s; loop held at most {late * 1e3:.1f} ms; watcher CPU {cpu:.2f} s "
        f"({cpu / max(events, 1) * 1e6:.0f} us/event); Python heap peak {peak / 1024:.0f} KiB; "
        f"lost {lost}; matched {matched}; remembered PIDs {len(w._seen)}"
    )


async def backlog(n: int, work: Path) -> str:
    """n live processes named ffmpeg whose exec events wait in the socket before the loop reads them (a
    burst faster than the watcher): how long the loop is held at a time while they are dispatched."""
    (work / "w.toml").write_text('[[rule]]\nname = "r"\nexe = "ffmpeg"\nargv = \'-listen 1\'\n')
    source = ProcEvents()
    w = Watcher(load(work / "w.toml"), lambda c: asyncio.sleep(0), source)
    procs = [subprocess.Popen([work / "ffmpeg", "60"]) for _ in range(n)]
    loop, late, seen = asyncio.get_running_loop(), 0.0, 0

    longest = 0.0  # CPU time of one wakeup (the lateness also counts the time other processes had the CPU)

    def on_events(batch: list[Event]) -> None:
        nonlocal seen, longest
        cpu = time.thread_time()
        seen += sum(isinstance(e, Exec) and e.pid in pids for e in batch)
        w.on_events(batch)
        longest = max(longest, time.thread_time() - cpu)

    pids = {p.pid for p in procs}
    start = time.monotonic()
    source.listen(loop, on_events)
    while seen < n:
        t = loop.time()
        await asyncio.sleep(0.001)
        late = max(late, loop.time() - t - 0.001)
    took = time.monotonic() - start
    source.close()
    for p in procs:
        p.kill()
        p.wait()
    return (
        f"{n} exec events waiting: dispatched in {took:.2f} s; the longest wakeup took {longest * 1e3:.0f} ms"
        f" of CPU; a 1 ms timer was late by at most {late * 1e3:.0f} ms"
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy("/bin/true", work / "ffmpeg")  # a short process named ffmpeg, as any user can make
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{n} processes per case; max RSS before {rss} KiB")
        for case, rule in CASES:
            print(f"- {case}: {asyncio.run(one(rule, n, work))}", flush=True)
        shutil.copy("/bin/sleep", work / "ffmpeg")  # now a long one
        print(f"- a backlog of live ones: {asyncio.run(backlog(min(n, 3000), work))}", flush=True)
        print(f"max RSS after {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB")


if __name__ == "__main__":
    main()
