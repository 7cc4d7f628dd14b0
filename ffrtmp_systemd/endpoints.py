"""The exporter's endpoints, /metrics, /violations, /healthz, served in the caller's event loop. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

# For any host with a running event loop, a Store and a Bus (the node agent, or `ffrtmp exporter`):
#
#     endpoints = await serve_http("127.0.0.1:9464", store, lambda: bus)   # listening once it returns
#     reconciler = Reconciler(store, bus, endpoints.unreadable)            # bad contracts are counted
#     ...
#     endpoints.close()                                                    # stops listening, drops clients
#
# `bus` is called at each request: the host's current Bus, or None when it has none (then /healthz is
# 503 and ffrtmp_systemd_up 0). serve_http raises UsageError for a bad `listen`, StateError for an
# untrusted state directory, FfrtmpError when it cannot listen. Nothing here blocks the loop: record
# files are read and prometheus_client is loaded (at the first scrape) in worker threads; systemd is
# asked in the loop, with the bus's time limit.

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from .counters import Family, Tally
from .httpd import Server, parse_listen
from .listing import Running, running
from .report.store import Store
from .systemd.bus import TIMEOUT, Bus, BusError

log = logging.getLogger(__name__)
T = TypeVar("T")


def _exposition(families: list[Family], jobs: list[Running] | None, accept: str) -> tuple[str, bytes]:
    from .metrics import exposition  # here, in a worker thread: prometheus_client only once scraped

    return exposition(families, jobs, accept)


class Endpoints:
    """What the exporter serves; `unreadable` is the Reconciler's callback, `close` the end."""

    def __init__(self, store: Store, bus: Callable[[], Bus | None]) -> None:
        self.store, self.bus = store, bus
        self.tally = Tally(store)
        self.http = Server(self.answer)
        self.unreadable = self.tally.unreadable

    async def answer(self, path: str, accept: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET of `path`."""
        if path == "/metrics":
            families = await asyncio.to_thread(self._counted, self.tally.families)
            jobs = await self._live()
            ctype, body = await asyncio.to_thread(_exposition, families, jobs, accept)
            return 200, ctype, body
        if path == "/violations":
            body = await asyncio.to_thread(self._counted, self.tally.violations_json)
            return 200, "application/json", body
        if path == "/healthz":
            bus = self.bus()
            ok = bus is not None and bus.connected
            return (200, "text/plain", b"ok\n") if ok else (503, "text/plain", b"systemd bus lost\n")
        return 404, "text/plain", b"not found: try /metrics, /violations, /healthz\n"

    def _counted(self, what: Callable[[], T]) -> T:
        """`what` of the records, new ones counted first: in a worker thread (it reads files)."""
        self.tally.refresh()
        return what()

    async def _live(self) -> list[Running] | None:
        """The running scopes, or None if systemd does not answer (in time)."""
        bus = self.bus()
        try:
            if bus is None:
                raise BusError("ffrtmp.Error.NoBus", "no connection to systemd")
            return await asyncio.wait_for(running(bus, self.store, False), TIMEOUT)
        except (BusError, TimeoutError) as err:
            log.warning("ffrtmp exporter: live gauges unavailable: %s", err)
            return None

    def close(self) -> None:
        self.http.close()


async def serve_http(listen: str, store: Store, bus: Callable[[], Bus | None]) -> Endpoints:
    """Check the state directory, count its records, listen on `listen` (HOST:PORT): see the top."""
    host, port = parse_listen(listen)
    await asyncio.to_thread(store.ids, store.results)  # an untrusted state directory is refused here
    ep = Endpoints(store, bus)
    await asyncio.to_thread(ep.tally.refresh)
    await ep.http.start(host, port)
    log.info("ffrtmp exporter: serving http://%s:%d/metrics for %s", host, port, store.state_dir)
    return ep
