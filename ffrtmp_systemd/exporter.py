"""The exporter: counters from frozen results, live gauges from systemd, /violations, /healthz. ONLY.

Each result file is read once (new names are found by listing the directory); counters live in
memory and are recomputed from the records at start. Orphans are reconciled when systemd says an
ffrtmp scope was removed (UnitRemoved) or when a process such a job waited for exits (pidfd).
"""
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
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from .errors import FfrtmpError, UsageError
from .listing import PREFIX, SUFFIX, Running, running
from .reconcile import LeftAlone, reconcile_all, reconcile_job
from .report.result import Mode, Reason, Result
from .report.store import Store
from .systemd.bus import TIMEOUT, Bus, BusError

log = logging.getLogger(__name__)
LAST_VIOLATIONS = 50
VIOLATIONS = [r.value for r in Reason if not r.compliant]
EXITS = ("0", "non_zero", "unknown")
RACY_NS = 1_000_000_000
HELP = {
    "ffrtmp_jobs": "Jobs by state: started (a contract or result seen), completed (result frozen).",
    "ffrtmp_platform_sla": "Frozen results by platform SLA verdict.",
    "ffrtmp_platform_sla_violations": "Frozen results that violate the platform SLA, by reason.",
    "ffrtmp_jobs_by_mode": "Frozen results by mode (run, attach).",
    "ffrtmp_jobs_by_exit": "Frozen results by exit: 0, non_zero (a non-zero status or a signal), unknown.",
}


def _names(d: Path) -> set[str]:
    """Names of the records in `d` (no file is opened)."""
    try:
        with os.scandir(d) as it:
            return {e.name for e in it if e.name.endswith(".json") and not e.name.startswith(".")}
    except FileNotFoundError:
        return set()


def exit_label(r: Result) -> str:
    if r.exit_code == 0:
        return "0"
    return "non_zero" if r.exit_code is not None or r.signal else "unknown"


class Tally:
    """Counters over the frozen results, each result file read once; the last violations, newest first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.seen: set[str] = set()  # result file names already counted
        self.started = 0
        self.counts: dict[str, Counter[str]] = {k: Counter() for k in ("sla", "reason", "mode", "exit")}
        self.violations: list[dict[str, Any]] = []
        self._mtime = self._listed = 0  # results/'s mtime at the last listing, and when that was (ns)

    def refresh(self) -> None:
        with self.lock:
            for name in sorted(_names(self.store.results) - self.seen) if self._changed() else ():
                self.seen.add(name)
                try:
                    r = self.store.result(name[: -len(".json")])
                except FfrtmpError as err:
                    log.warning("ffrtmp exporter: %s: not counted: %s", name, err)
                    continue
                if r is not None:
                    self._count(r)
            pending = len(_names(self.store.jobs) - self.seen)
            self.started = max(self.started, len(self.seen) + pending)  # never goes down

    def _changed(self) -> bool:
        """Whether results/ may hold names not listed yet: a scrape costs one stat while nothing changed.

        Its mtime moved, or it was so close to the last listing that a later change could carry the
        same coarse timestamp (the racy case git's index knows): then list again."""
        try:
            mtime = self.store.results.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self._mtime and self._listed - mtime > RACY_NS:
            return False
        self._mtime, self._listed = mtime, time.time_ns()
        return True

    def _count(self, r: Result) -> None:
        c = self.counts
        c["sla"][str(r.platform_sla_compliant).lower()] += 1
        c["mode"][str(r.mode)] += 1
        c["exit"][exit_label(r)] += 1
        if not r.platform_sla_compliant:
            c["reason"][str(r.platform_sla_reason)] += 1
            self.violations.append(
                {
                    "job_id": r.job_id,
                    "reason": str(r.platform_sla_reason),
                    "mode": str(r.mode),
                    "processing_seconds": r.processing_seconds,
                    "exit_code": r.exit_code,
                    "pid": r.pid,
                    "end_time": r.end_time,
                }
            )
            self.violations.sort(key=lambda v: (v["end_time"], v["job_id"]), reverse=True)
            del self.violations[LAST_VIOLATIONS:]

    def metrics(self) -> Iterator[Metric]:
        with self.lock:
            c, done = self.counts, len(self.seen)
            families = [
                ("ffrtmp_jobs", "state", {"started": self.started, "completed": done}),
                ("ffrtmp_platform_sla", "compliant", {k: c["sla"][k] for k in ("true", "false")}),
                ("ffrtmp_platform_sla_violations", "reason", {k: c["reason"][k] for k in VIOLATIONS}),
                ("ffrtmp_jobs_by_mode", "mode", {m.value: c["mode"][m.value] for m in Mode}),
                ("ffrtmp_jobs_by_exit", "exit", {k: c["exit"][k] for k in EXITS}),
            ]
        for name, label, values in families:
            m = CounterMetricFamily(name, HELP[name], labels=[label])
            for value, n in values.items():
                m.add_metric([value], n)
            yield m

    def violations_json(self) -> bytes:
        with self.lock:
            return (json.dumps(self.violations, sort_keys=True, indent=2) + "\n").encode()


def live_metrics(jobs: list[Running] | None) -> Iterator[Metric]:
    up = GaugeMetricFamily("ffrtmp_systemd_up", "1 if systemd answered for the live gauges, else 0.")
    up.add_metric([], 0 if jobs is None else 1)
    yield up
    if jobs is None:
        return
    yield GaugeMetricFamily("ffrtmp_running_jobs", "ffrtmp scopes systemd runs now.", value=len(jobs))
    mem = GaugeMetricFamily(
        "ffrtmp_job_memory_bytes", "Memory of a running job's scope (systemd's MemoryCurrent).",
        labels=["job_id", "mode"],
    )  # fmt: skip
    cpu = CounterMetricFamily(
        "ffrtmp_job_cpu_seconds", "CPU time of a running job's scope (systemd's CPUUsageNSec).",
        labels=["job_id", "mode"],
    )  # fmt: skip
    for j in jobs:
        if j.memory_bytes is not None:
            mem.add_metric([j.job_id, j.mode or ""], j.memory_bytes)
        if j.cpu_seconds is not None:
            cpu.add_metric([j.job_id, j.mode or ""], j.cpu_seconds)
    yield mem
    yield cpu


class Exporter:
    """The state shared by the HTTP threads and the event loop that talks to systemd."""

    def __init__(self, store: Store, bus: Bus, loop: asyncio.AbstractEventLoop) -> None:
        self.store, self.bus, self.loop = store, bus, loop
        self.tally = Tally(store)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pidfds: dict[str, int] = {}  # job -> pidfd of a process it waits for

    def collect(self) -> Iterator[Metric]:  # called by prometheus_client in an HTTP thread
        self.tally.refresh()
        yield from self.tally.metrics()
        try:
            jobs = asyncio.run_coroutine_threadsafe(running(self.bus, self.store, False), self.loop)
            yield from live_metrics(jobs.result(TIMEOUT))
        except (BusError, TimeoutError) as err:
            log.warning("ffrtmp exporter: live gauges unavailable: %s", err)
            yield from live_metrics(None)

    # -- reconciliation, in the event loop --------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def unit_removed(self, unit: str) -> None:
        if unit.startswith(PREFIX) and unit.endswith(SUFFIX):
            self._spawn(self.reconcile(unit[len(PREFIX) : -len(SUFFIX)]))

    async def reconcile(self, job: str) -> None:
        try:
            self._after(await reconcile_job(self.store, self.bus, job))
        except (FfrtmpError, BusError) as err:
            log.warning("ffrtmp exporter: job %s: not reconciled: %s", job, err)

    async def reconcile_all(self) -> None:
        for r in await reconcile_all(self.store, self.bus):
            self._after(r)

    def _after(self, r: Result | LeftAlone | None) -> None:
        """A job left alone while a process of it lives is looked at again when that process exits."""
        if not isinstance(r, LeftAlone) or r.pid is None or r.job_id in self._pidfds:
            return
        try:
            fd = os.pidfd_open(r.pid)
        except ProcessLookupError:
            self._spawn(self.reconcile(r.job_id))
            return
        self._pidfds[r.job_id] = fd
        self.loop.add_reader(fd, self._exited, r.job_id)

    def _exited(self, job: str) -> None:
        fd = self._pidfds.pop(job)
        self.loop.remove_reader(fd)
        os.close(fd)
        self._spawn(self.reconcile(job))


def handler(ex: Exporter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path == "/metrics":
                encode, ctype = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, ctype, encode(ex.registry))
            elif path == "/violations":
                ex.tally.refresh()
                self._reply(200, "application/json", ex.tally.violations_json())
            elif path == "/healthz":
                ok = ex.bus.connected
                self._reply(200 if ok else 503, "text/plain", b"ok\n" if ok else b"systemd bus lost\n")
            else:
                self._reply(404, "text/plain", b"not found: try /metrics, /violations, /healthz\n")

        def _reply(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # no line per request
            pass

    return Handler


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: expected HOST:PORT, e.g. 127.0.0.1:9464, got {listen!r}")
    return host, int(port)


def _ready() -> None:
    """Under systemd (Type=notify): listening now, so `systemctl start` returns only when it serves."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith(("/", "@")):
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", "\0" + addr[1:] if addr.startswith("@") else addr)


def serve(listen: str, store: Store) -> int:
    """Run until SIGTERM/SIGINT (returns 0) or until the system bus is lost (raises)."""
    host, port = parse_listen(listen)
    return asyncio.run(_serve(host, port, store))


async def _serve(host: str, port: int, store: Store) -> int:
    loop = asyncio.get_running_loop()
    try:
        bus = await Bus.connect()
        ex = Exporter(store, bus, loop)
        await bus.on_unit_removed(ex.unit_removed)
    except BusError as err:
        raise FfrtmpError(f"cannot reach systemd: {err}") from None
    ex.tally.refresh()
    server = type(
        "Server",
        (ThreadingHTTPServer,),
        {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
    )
    try:
        httpd = server((host, port), handler(ex))
    except OSError as err:
        raise FfrtmpError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    httpd.socket.setblocking(False)  # accepted by the loop when readable (serve_forever wakes twice a second)
    loop.add_reader(httpd.fileno(), httpd.handle_request)  # each request then runs in a thread of its own
    log.info("ffrtmp exporter: serving http://%s:%d/metrics for %s", host, port, store.state_dir)
    _ready()
    await ex.reconcile_all()  # orphans of the time nobody listened for UnitRemoved
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped, lost = asyncio.create_task(stop.wait()), asyncio.create_task(bus.disconnected())
    await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    loop.remove_reader(httpd.fileno())
    httpd.server_close()
    if not stopped.done():
        raise FfrtmpError("lost the connection to the system bus")
    stopped.cancel()
    lost.cancel()
    bus.close()
    return 0
