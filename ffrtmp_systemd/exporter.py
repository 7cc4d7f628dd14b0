"""`ffrtmp exporter`, the standalone host of the exporter's endpoints (nodes without the agent): its own
bus connection, the Reconciler, sd_notify, SIGTERM. Hosting ONLY.

What it serves is endpoints.py's; orphans are reconciled (reconcile.Reconciler) at start, when
systemd says an ffrtmp scope was removed and when a process such a job waited for exits. It runs
until SIGTERM/SIGINT (exit 0) or until the system bus is lost (an error: systemd restarts it).
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from .endpoints import serve_http
from .errors import FfrtmpError
from .httpd import parse_listen
from .reconcile import Reconciler
from .report.store import Store
from .systemd.bus import Bus, BusError


def notify_ready() -> None:
    """Under systemd (Type=notify): listening now, so `systemctl start` returns only when it serves."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith(("/", "@")):
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", "\0" + addr[1:] if addr.startswith("@") else addr)


def serve(listen: str, store: Store) -> int:
    """Run until SIGTERM/SIGINT (returns 0) or until the system bus is lost (raises)."""
    parse_listen(listen)  # a usage error before anything else
    return asyncio.run(_serve(listen, store))


async def _serve(listen: str, store: Store) -> int:
    try:
        bus = await Bus.connect()
    except BusError as err:
        raise FfrtmpError(f"cannot reach systemd: {err}") from None
    with contextlib.ExitStack() as stack:
        stack.callback(bus.close)
        endpoints = await serve_http(listen, store, lambda: bus)
        stack.callback(endpoints.close)
        reconciler = Reconciler(store, bus, endpoints.unreadable)
        stack.callback(reconciler.close)
        try:
            await bus.on_unit_removed(reconciler.unit_removed)
        except BusError as err:
            raise FfrtmpError(f"cannot reach systemd: {err}") from None
        notify_ready()
        await reconciler.reconcile_all()  # orphans of the time nobody listened for UnitRemoved
        stop, loop = asyncio.Event(), asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        stopped, lost = asyncio.create_task(stop.wait()), asyncio.create_task(bus.disconnected())
        await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        lost.cancel()
        if not stop.is_set():
            raise FfrtmpError("lost the connection to the system bus")
    return 0
