"""The systemd client: create a scope, find a unit's PIDs, read/change properties, hear removals. Only."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

SD, SD_PATH = "org.freedesktop.systemd1", "/org/freedesktop/systemd1"
MANAGER, UNIT, SCOPE = f"{SD}.Manager", f"{SD}.Unit", f"{SD}.Scope"
PROPS = "org.freedesktop.DBus.Properties"
DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
# Every call's time limit and a taken start job's; FFRTMP_BUS_TIMEOUT=SECONDS overrides it (a test hook).
_HOOK = os.environ.get("FFRTMP_BUS_TIMEOUT", "")
TIMEOUT = float(_HOOK) if _HOOK.replace(".", "", 1).isdigit() and float(_HOOK) > 0 else 5.0
ERR = "org.freedesktop.DBus.Error."
UNKNOWN = "ffrtmp.Error.OutcomeUnknown"  # sent, but no reply or no JobRemoved heard: it may have happened
# A unit's own property changes (not those of its Scope or Service interface: half the signals, unread)
_CHANGED = f"interface='{PROPS}',member='PropertiesChanged',arg0='{UNIT}'"
Property = tuple[str, str, object]  # (name, D-Bus signature, value)
# Calls in flight on one connection at most: dbus-next drops its connection when the socket's send buffer
# is full (EAGAIN on a new message), which hundreds of concurrent calls (an agent's many jobs) reach.
IN_FLIGHT, STARTS = 32, 8  # and scope starts at once (a call, then its start job): each its own TIMEOUT
RUNNING = ("active", "activating", "deactivating", "reloading", "refreshing")  # ActiveState: not over
_user_bus: list[str] = []  # the calling user's bus address when `--user` chose it; else the system bus


def use_user_bus() -> None:
    """Talk to the user's own service manager, where `systemctl --user` and `systemd-run --user` do."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    _user_bus.append(os.environ.get("DBUS_SESSION_BUS_ADDRESS") or f"unix:path={runtime}/bus")


def on_user_bus() -> bool:
    return bool(_user_bus)


def stamp(usec: int | None) -> datetime | None:
    """A systemd realtime timestamp (µs since the epoch; 0: never) as a time."""
    return datetime.fromtimestamp(usec / 1e6, UTC) if usec else None


class BusError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{text} ({name})" if text else name)
        self.name = name


async def in_order(*calls: Awaitable[Any]) -> list[Any]:
    """One round trip; the bus keeps a connection's order, so a match is in place before a later read."""
    out = await asyncio.gather(*calls, return_exceptions=True)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def _variants(props: Sequence[Property]) -> list[list[Any]]:
    return [[k, Variant(s, v)] for k, s, v in props]


T = TypeVar("T")


def with_bus(work: Callable[[Bus], Awaitable[T]]) -> T:
    """Connect, run `work(bus)` to its end, disconnect: the one-shot commands."""

    async def once() -> T:
        bus = await Bus.connect()
        try:
            return await work(bus)
        finally:
            bus.close()

    return asyncio.run(once())


class Bus:
    """`broad` (the agent: many jobs on one connection): one JobRemoved and one PropertiesChanged match
    for every unit, dispatched by unit and path here (dbus-daemon allows 512 match rules a connection);
    else a match per unit (an in-process wrapper wakes for its own unit only)."""

    def __init__(self, bus: MessageBus, broad: bool = False) -> None:
        self._bus = bus
        self.broad = broad
        self._jobs: dict[str, asyncio.Future[str]] = {}  # unit name -> result of its start job
        self._watches: dict[str, Callable[[dict[str, Any]], None]] = {}  # unit path -> callback
        self._removed: Callable[[str], None] | None = None
        self.lost: str | None = None  # when and why the connection dropped (close() is not a loss)
        self.scope_oom_policy = False  # this manager's scopes take OOMPolicy (asked at connect)
        self._flight = asyncio.Semaphore(IN_FLIGHT)  # FIFO: calls keep their order (in_order)
        self._starts = asyncio.Semaphore(STARTS)
        self._gone = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        self._gone.add_done_callback(self._on_gone)
        bus.add_message_handler(self._on_message)

    def _on_gone(self, gone: asyncio.Future[None]) -> None:
        err = None if gone.cancelled() else gone.exception()  # taken, else asyncio logs it; no reconnect
        if err is not None:
            at, which = (
                datetime.now(UTC).isoformat(timespec="microseconds"),
                "user" if _user_bus else "system",
            )
            self.lost = f"{which} bus connection lost at {at} ({type(err).__name__})"
        for name, job in self._jobs.items():  # its JobRemoved can no longer reach us: say so now
            if not job.done():
                job.set_exception(
                    BusError(UNKNOWN, f"start job of {name}: outcome unknown, {self.lost or 'closed'}")
                )

    @classmethod
    async def connect(cls, broad: bool = False) -> Bus:
        try:
            bus = MessageBus(_user_bus[0]) if _user_bus else MessageBus(bus_type=BusType.SYSTEM)
            self = cls(await asyncio.wait_for(bus.connect(), TIMEOUT), broad)
        except Exception as err:  # dbus-next raises any Exception on a failed connect, or times out
            where = f"the user bus ({_user_bus[0]})" if _user_bus else "the system bus"
            why = f"cannot reach {where}: {str(err) or type(err).__name__}"
            raise BusError(f"{ERR}NoServer", why) from err
        try:  # one round trip: the subscription, and whether this manager's scopes take OOMPolicy
            _, self.scope_oom_policy = await in_order(
                self._call(SD_PATH, MANAGER, "Subscribe"), self.scope_has("OOMPolicy")
            )
            if broad:
                await in_order(
                    self._match(f"interface='{MANAGER}',member='JobRemoved'"),
                    self._match(f"path_namespace='{SD_PATH}/unit',{_CHANGED}"),
                )
        except BaseException:  # refused (or cancelled): the connection is not left to the collector
            self.close()
            raise
        return self

    def close(self) -> None:
        """Disconnect and free the socket now (dbus-next only shuts it down, leaving the descriptor to
        the garbage collector); again: nothing."""
        if self._bus._sock.fileno() >= 0:
            self._bus.disconnect()  # type: ignore[no-untyped-call]
            self._bus._finalize()  # type: ignore[no-untyped-call]  # its reader gone, pending calls failed
            self._bus._sock.close()  # closed once its file object is too
            with contextlib.suppress(OSError):
                self._bus._stream.close()

    @property
    def connected(self) -> bool:
        return bool(self._bus.connected)

    async def _call(
        self, path: str, iface: str, member: str, sig: str = "", body: Sequence[Any] = (), dest: str = SD
    ) -> list[Any]:
        if not self._bus.connected:  # a call on a dropped connection would only wait for its timeout
            raise BusError(f"{ERR}Disconnected", f"{member}: {self.lost or 'not connected'}")
        msg = Message(dest, path, iface, member, signature=sig, body=list(body))
        try:
            async with self._flight:
                reply = await asyncio.wait_for(self._bus.call(msg), TIMEOUT)
        except TimeoutError as err:
            raise BusError(UNKNOWN, f"{member}: no reply in {TIMEOUT} s") from err
        except Exception as err:  # dbus-next fails a pending call with whatever broke the connection
            raise BusError(UNKNOWN, f"{member}: no reply, {err!r}") from err
        assert reply is not None  # a method call without NO_REPLY_EXPECTED: dbus-next waits for one
        if reply.message_type == MessageType.ERROR:
            raise BusError(reply.error_name or "", str(reply.body[0]) if reply.body else "")
        return list(reply.body)

    async def _match(self, rule: str) -> None:
        await self._call(DBUS[1], DBUS[2], "AddMatch", "s", [f"type='signal',sender='{SD}',{rule}"], DBUS[0])

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL or msg.destination:  # systemd's are broadcasts: anyone
            return  # on the bus may send a signal to this connection alone (the policy allows it)
        if msg.member == "JobRemoved" and msg.interface == MANAGER:
            job = self._jobs.get(msg.body[2])
            if job is not None and not job.done():
                job.set_result(msg.body[3])
        elif msg.member == "PropertiesChanged" and msg.path in self._watches and msg.body[0] == UNIT:
            self._watches[msg.path]({k: v.value for k, v in msg.body[1].items()})
        elif msg.member == "UnitRemoved" and msg.interface == MANAGER and self._removed is not None:
            self._removed(msg.body[0])

    async def start_scope(self, name: str, props: Sequence[Property]) -> None:
        async with self._starts:
            await self._start_scope(name, props)

    async def _start_scope(self, name: str, props: Sequence[Property]) -> None:
        job = self._jobs[name] = asyncio.get_running_loop().create_future()
        body = [name, "fail", _variants(props), []]
        late = False
        try:  # the match for this unit's jobs only, in place before the start
            rule = f"interface='{MANAGER}',member='JobRemoved',arg2='{name}'"
            match = () if self.broad else (self._match(rule),)
            *_, (path,) = await in_order(
                *match, self._call(SD_PATH, MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))", body)
            )
            try:
                result = await asyncio.wait_for(asyncio.shield(job), TIMEOUT)
            except TimeoutError:  # withdraw our request rather than be governed at an unknown later time
                late = True
                result = await asyncio.wait_for(self._cancel(path, job), TIMEOUT)
        except TimeoutError as err:
            raise BusError(UNKNOWN, f"start job of {name}: outcome unknown, late and not cancelled") from err
        finally:
            del self._jobs[name]
            if job.done() and not job.cancelled():
                job.exception()  # taken even when the call itself failed first, else asyncio logs it
        if late and result == "canceled":
            why = f"not done after {TIMEOUT} s: cancelled, its PIDs stay where they were"
            raise BusError(f"{SD}.JobCanceled", f"start job of {name} {why}")
        if result != "done":
            raise BusError(f"{SD}.JobFailed", f"start job of {name} finished with result '{result}'")

    async def _cancel(self, path: str, job: asyncio.Future[str]) -> str:
        try:
            await self._call(path, f"{SD}.Job", "Cancel")
        except BusError as err:
            if err.name not in (f"{SD}.NoSuchJob", f"{ERR}UnknownObject"):  # else it has just ended: its
                # JobRemoved says how (systemd 252 answers UnknownObject for a job path that is gone)
                raise BusError(UNKNOWN, f"late start job {path}: outcome unknown: {err}") from None
        return await job

    async def scope_has(self, prop: str) -> bool:
        """Whether this manager's scopes know `prop`, asked of its init.scope: what it has, not a version."""
        try:
            await self.get(f"{SD_PATH}/unit/init_2escope", SCOPE, prop)
        except BusError:  # unknown property, or no answer: DO LESS, do not send it
            return False
        return True

    async def unit_path(self, name: str) -> str:
        return str((await self._call(SD_PATH, MANAGER, "GetUnit", "s", [name]))[0])

    async def unit_of_pid(self, pid: int) -> str | None:
        try:
            path = (await self._call(SD_PATH, MANAGER, "GetUnitByPID", "u", [pid]))[0]
        except BusError as err:
            if err.name == f"{SD}.NoUnitForPID":
                return None
            raise
        return str(await self.get(path, UNIT, "Id"))

    async def properties(self, path: str, iface: str = UNIT) -> dict[str, Any]:
        body = await self._call(path, PROPS, "GetAll", "s", [iface])
        return {k: v.value for k, v in body[0].items()}

    async def get(self, path: str, iface: str, name: str) -> Any:
        return (await self._call(path, PROPS, "Get", "ss", [iface, name]))[0].value

    async def watch(self, path: str, callback: Callable[[dict[str, Any]], None]) -> None:
        self._watches[path] = callback
        if not self.broad:
            await self._match(f"path='{path}',{_CHANGED}")

    def unwatch(self, path: str) -> None:
        self._watches.pop(path, None)

    async def set_properties(self, name: str, props: Sequence[Property]) -> None:
        await self._call(SD_PATH, MANAGER, "SetUnitProperties", "sba(sv)", [name, True, _variants(props)])

    async def list_units(self, pattern: str) -> list[tuple[str, str, str]]:
        """(name, active state, object path) of the loaded units matching a glob pattern."""
        body = await self._call(SD_PATH, MANAGER, "ListUnitsByPatterns", "asas", [[], [pattern]])
        return [(u[0], u[3], u[6]) for u in body[0]]

    async def on_unit_removed(self, callback: Callable[[str], None]) -> None:
        self._removed = callback
        await self._match(f"interface='{MANAGER}',member='UnitRemoved'")

    async def unit_processes(self, name: str) -> list[int]:
        body = await self._call(SD_PATH, MANAGER, "GetUnitProcesses", "s", [name])
        return [int(p[1]) for p in body[0]]

    async def disconnected(self) -> None:
        await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
