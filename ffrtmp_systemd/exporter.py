"""The exporter: counters from frozen results, live gauges from systemd, /violations, /healthz. ONLY.

Each result file is read once (new names are found by listing the directory); counters live in
memory and are recomputed from the records at start; a bad record is named, counted and skipped.
Orphans are reconciled when systemd says an ffrtmp scope was removed (UnitRemoved) or when a process
such a job waited for exits (pidfd). HTTP is served by the event loop: an idle client costs a socket,
never a thread; connections are bounded and timed.
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
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from .errors import FfrtmpError, UsageError
from .listing import PREFIX, SUFFIX, Running, running
from .reconcile import LeftAlone, Unreadable, reconcile_all, reconcile_job
from .report.result import Mode, Reason, Result
from .report.store import Store
from .systemd.bus import TIMEOUT, Bus, BusError

log = logging.getLogger(__name__)
LAST_VIOLATIONS = 50
VIOLATIONS = [r.value for r in Reason if not r.compliant]
EXITS = ("0", "non_zero", "unknown")
RACY_NS = 1_000_000_000
MAX_CONNECTIONS = 256  # beyond, the oldest connection (first one that has not sent its request) is dropped
CLIENT_SECONDS = 10  # to send the request, then again to take the answer
HEAD_LIMIT = 8192
HELP = {
    "ffrtmp_jobs": "Jobs by state: started (a contract or result seen), completed (result frozen).",
    "ffrtmp_platform_sla": "Frozen results by platform SLA verdict.",
    "ffrtmp_platform_sla_violations": "Frozen results that violate the platform SLA, by reason.",
    "ffrtmp_jobs_by_mode": "Frozen results by mode (run, attach).",
    "ffrtmp_jobs_by_exit": "Frozen results by exit: 0, non_zero (a non-zero status or a signal), unknown.",
    "ffrtmp_bad_records": "Record files skipped as unreadable or invalid (named in the log), by kind.",
}


def exit_label(r: Result) -> str:
    if r.exit_code == 0:
        return "0"
    return "non_zero" if r.exit_code is not None or r.signal else "unknown"


class Tally:
    """Counters over the frozen results, each result file read once; the last violations, newest first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lock = threading.Lock()
        self.seen: set[str] = set()  # job ids of the results already read
        self.bad: dict[str, set[str]] = {"contract": set(), "result": set()}  # job ids of bad records
        self.started = 0
        self.counts: dict[str, Counter[str]] = {k: Counter() for k in ("sla", "reason", "mode", "exit")}
        self.violations: list[dict[str, Any]] = []
        self._mtime = self._listed = 0  # results/'s mtime at the last listing, and when that was (ns)

    def refresh(self) -> None:
        with self.lock:
            try:
                new = self.store.ids(self.store.results) if self._changed() else []
                pending = len(set(self.store.ids(self.store.jobs)) - self.seen)
            except FfrtmpError as err:
                log.warning("ffrtmp exporter: records not read: %s", err)
                return
            for job in (j for j in new if j not in self.seen):
                self.seen.add(job)
                try:
                    r = self.store.result(job)
                except FfrtmpError as err:
                    log.warning("ffrtmp exporter: not counted: %s", err)
                    self.bad["result"].add(job)
                    continue
                if r is not None:
                    self._count(r)
            self.started = max(self.started, len(self.seen) + pending)  # never goes down

    def _changed(self) -> bool:
        """Whether results/ may hold names not listed yet: a scrape costs one stat while nothing changed.

        Its mtime moved, or it was so close to the last listing that a later change could carry the
        same coarse timestamp (the racy case git's index knows): then list again."""
        mtime = self.store.stamp(self.store.results)
        if not mtime or (mtime == self._mtime and self._listed - mtime > RACY_NS):
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
            c, done = self.counts, len(self.seen) - len(self.bad["result"])
            families = [
                ("ffrtmp_jobs", "state", {"started": self.started, "completed": done}),
                ("ffrtmp_platform_sla", "compliant", {k: c["sla"][k] for k in ("true", "false")}),
                ("ffrtmp_platform_sla_violations", "reason", {k: c["reason"][k] for k in VIOLATIONS}),
                ("ffrtmp_jobs_by_mode", "mode", {m.value: c["mode"][m.value] for m in Mode}),
                ("ffrtmp_jobs_by_exit", "exit", {k: c["exit"][k] for k in EXITS}),
                ("ffrtmp_bad_records", "kind", {k: len(v) for k, v in self.bad.items()}),
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

    def _after(self, r: Result | LeftAlone | Unreadable | None) -> None:
        """A job left alone while a process of it lives is looked at again when that process exits."""
        if isinstance(r, Unreadable):
            with self.tally.lock:
                self.tally.bad["contract"].add(r.job_id)
        if not isinstance(r, LeftAlone) or r.pid is None or r.job_id in self._pidfds:
            return
        try:
            fd = os.pidfd_open(r.pid)
        except ProcessLookupError:
            self._spawn(self.reconcile(r.job_id))
            return
        except OSError as err:
            log.warning("ffrtmp exporter: job %s: cannot watch PID %d: %s", r.job_id, r.pid, err)
            return
        self._pidfds[r.job_id] = fd
        self.loop.add_reader(fd, self._exited, r.job_id)

    def _exited(self, job: str) -> None:
        fd = self._pidfds.pop(job)
        self.loop.remove_reader(fd)
        os.close(fd)
        self._spawn(self.reconcile(job))


def answer(ex: Exporter, path: str, accept: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; runs in a worker thread (a scrape asks the loop for systemd)."""
    if path == "/metrics":
        encode, ctype = choose_encoder(accept)
        return 200, ctype, encode(ex.registry)
    if path == "/violations":
        ex.tally.refresh()
        return 200, "application/json", ex.tally.violations_json()
    if path == "/healthz":
        ok = ex.bus.connected
        return (200, "text/plain", b"ok\n") if ok else (503, "text/plain", b"systemd bus lost\n")
    return 404, "text/plain", b"not found: try /metrics, /violations, /healthz\n"


class Http:
    """One GET per connection, served by the event loop: waiting for a client costs a socket, not a thread.

    At most MAX_CONNECTIONS at once (a new one drops the oldest that has not sent its request, else
    the oldest); CLIENT_SECONDS to send the request and as many to take the answer. A client's
    misbehaviour (a reset, a timeout, garbage) closes its connection silently."""

    def __init__(self, ex: Exporter) -> None:
        self.ex = ex
        self.conns: dict[asyncio.StreamWriter, bool] = {}  # oldest first; True once its request is in

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns[writer] = False
        if len(self.conns) > MAX_CONNECTIONS:
            oldest = next((w for w, busy in self.conns.items() if not busy), next(iter(self.conns)))
            del self.conns[oldest]
            oldest.transport.abort()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_SECONDS)
            self.conns[writer] = True
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            fields = dict(ln.partition(":")[::2] for ln in lines[1:] if ln)
            accept = next((v.strip() for k, v in fields.items() if k.lower() == "accept"), "")
            if method == "GET":
                path, loop = urlsplit(target).path, asyncio.get_running_loop()
                code, ctype, body = await loop.run_in_executor(None, answer, self.ex, path, accept)
            else:
                code, ctype, body = 405, "text/plain", b"only GET\n"
            status = f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {ctype}\r\n"
            writer.write(f"{status}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), CLIENT_SECONDS)
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.LimitOverrunError):
            pass  # the client's doing: its connection is closed, nothing else
        finally:
            self.conns.pop(writer, None)
            writer.transport.abort()

    def close(self) -> None:
        for w in list(self.conns):
            w.transport.abort()


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
    store.ids(store.results)  # an untrusted state directory is refused here, before anything is served
    ex.tally.refresh()
    http = Http(ex)
    try:
        server = await asyncio.start_server(
            http.serve, host, port, limit=HEAD_LIMIT, backlog=socket.SOMAXCONN, reuse_address=True
        )
    except OSError as err:
        raise FfrtmpError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    log.info("ffrtmp exporter: serving http://%s:%d/metrics for %s", host, port, store.state_dir)
    _ready()
    await ex.reconcile_all()  # orphans of the time nobody listened for UnitRemoved
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped, lost = asyncio.create_task(stop.wait()), asyncio.create_task(bus.disconnected())
    await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    server.close()
    http.close()
    if not stopped.done():
        raise FfrtmpError("lost the connection to the system bus")
    stopped.cancel()
    lost.cancel()
    bus.close()
    return 0
