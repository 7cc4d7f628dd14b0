"""The node agent: serves the varlink calls of varlink.py on a unix socket, one bus for every job; and the
same handler in-process (`inprocess()`), for a client with no agent. Hosting ONLY: governance is wrapper/."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import varlink
from .errors import FfrtmpError
from .limits import Limits
from .names import check_intent, job_id
from .presentation import summary_line
from .proc import check_adoptable, parent
from .reconcile import Reconciler, workload_alive, wrapper_alive
from .report.result import Result
from .report.store import BadRecord, Store
from .systemd.bus import Bus, BusError, on_user_bus, use_user_bus
from .wrapper.govern import Job, Lock, adopt, end, resume, start

if TYPE_CHECKING:  # the agent's own; the in-process host never loads them
    from .discover import Watcher
    from .endpoints import Endpoints

log = logging.getLogger(__name__)
ERR = f"{varlink.INTERFACE}."
UNKNOWN_EXIT = "exit status unknown"


class CallError(Exception):
    """A call answered with an error: NAME (in the Agent interface), message, more parameters."""

    def __init__(self, name: str, message: str, **parameters: Any) -> None:
        super().__init__(message)
        self.name, self.parameters = name, parameters


class Host:
    """What every connection shares: the bus, the jobs being observed, the attach lock."""

    def __init__(self, bus: Bus | None, lock: Lock, agent: bool) -> None:
        """`bus` None: connected at the first call that needs it, after that call's contract is written
        (in-process, as a wrapper always did: a wrapper stuck on a silent bus leaves a contract)."""
        self.bus, self.lock, self.agent = bus, lock, agent
        self._connecting = asyncio.Lock()
        self.jobs: dict[str, Job] = {}  # job id -> a job observed here, until frozen
        self.making: set[str] = set()  # job ids whose Run or Attach is under way
        self.tasks: set[asyncio.Task[Any]] = set()
        self.idle = asyncio.Event()  # no job left (the agent exits on it once its bus is lost)
        self.events: Watcher | None = None  # the watch rules' process events (the agent's, with rules)
        self.expecting: set[str] = set()  # job ids whose exit event `events` keeps for their record

    def spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:  # said, never lost silently
            log.error("ffrtmp: agent: a job's freeze failed: %r", err)

    async def connect(self) -> Bus:
        async with self._connecting:
            if self.bus is None:
                self.bus = await Bus.connect()
        return self.bus

    def observing(self, job: str) -> bool:
        """Ours: observed here, or being made by a Run or Attach (its contract may be written, its scope
        may even be gone already, before the job is ours to freeze): never the Reconciler's."""
        return job in self.jobs or job in self.making

    @contextlib.contextmanager
    def being_made(self, job: str) -> Iterator[None]:
        self.making.add(job)
        try:
            yield
        finally:
            self.making.discard(job)

    def expect(self, pid: int) -> bool:
        """Where process events are had: keep `pid`'s exit event for its attach job's record."""
        if self.events is not None:
            self.events.expect(pid)
        return self.events is not None

    def add(self, j: Job) -> None:
        self.jobs[j.c.job_id] = j
        self.idle.clear()

    def drop(self, j: Job) -> None:
        if self.jobs.get(j.c.job_id) is j:
            del self.jobs[j.c.job_id]
        if not self.jobs:
            self.idle.set()

    async def finish(self, j: Job, status: tuple[int | None, int | None], note: str | None) -> Result | None:
        """Freeze once (the first caller; a later one gets the same record)."""
        if j.result is None:
            j.result = asyncio.ensure_future(self._end(j, status, note))
            j.result.add_done_callback(lambda _: self.drop(j))
        return await asyncio.shield(j.result)

    async def _end(self, j: Job, status: tuple[int | None, int | None], note: str | None) -> Result | None:
        """An attach job whose exit event was kept: frozen with its real exit status (as a watch job)."""
        job, events = j.c.job_id, self.events
        try:
            if job in self.expecting and events is not None and status == (None, None):
                await j.w.wait()
                if j.w.exited() and (status := events.exit_status(j.c.pid)) != (None, None):
                    known = "exit status from its exit event"
                    note, j.note = (x and x.replace(UNKNOWN_EXIT, known) for x in (note, j.note))
            return await end(j, self.bus, status, note)
        finally:
            if job in self.expecting and events is not None:
                self.expecting.discard(job)
                events.forget(j.c.pid)


def _peer(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


class Conn:
    """One client connection: its calls answered in order, its jobs frozen even if it goes away."""

    def __init__(self, host: Host, peer: tuple[int, int]) -> None:
        self.host, (self.pid, self.uid) = host, peer
        self.jobs: dict[str, Job] = {}
        self.finishing: set[str] = set()
        self.gone = False  # the connection closed

    def _root(self) -> None:
        """In the agent only: in-process, the peer is this very process, governing with its own rights."""
        if self.uid != 0 and self.host.agent:
            raise CallError("PermissionDenied", f"uid {self.uid} may not govern jobs: only root may")

    def _available(self) -> None:
        bus = self.host.bus
        if bus is not None and (bus.lost or not bus.connected):
            raise CallError("Unavailable", f"the agent cannot govern: {bus.lost or 'no bus'}")

    @staticmethod
    def _job(p: dict[str, Any]) -> tuple[str, Limits, str | None, Store]:
        try:
            limits = Limits.from_dict(dict(p.get("limits") or {}))
            sd = p.get("state_dir")
            if not isinstance(sd, str) or not sd.startswith("/"):
                raise FfrtmpError(f"state_dir must be an absolute path, not {sd!r}", 2)
            return job_id(str(p["job_id"])), limits, check_intent(p.get("intent")), Store(Path(sd))
        except (KeyError, TypeError, ValueError) as err:
            raise CallError("InvalidParameter", f"bad parameters: {err!r}") from None

    async def call(self, method: str, p: dict[str, Any]) -> dict[str, Any]:
        name = method.removeprefix(ERR)
        if name == "Run":
            return await self.run(p)
        if name == "Attach":
            return await self.attach(p)
        if name == "Finish":
            return await self.finish(p)
        raise CallError("MethodNotFound", f"no method {method!r}")

    async def run(self, p: dict[str, Any]) -> dict[str, Any]:
        self._root()
        pid = p.get("pid")
        if not isinstance(pid, int) or pid <= 0 or parent(pid) != self.pid:
            raise CallError("PermissionDenied", f"PID {pid!r} is not a child of the caller (PID {self.pid})")
        self._available()
        command = p.get("command")
        if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
            raise CallError("InvalidParameter", "command must be a list of strings")
        lines: list[list[Any]] = []
        try:
            job, limits, intent, store = self._job(p)
            say = _collect(lines)
            with self.host.being_made(job):
                j = await start(self.host.connect, store, job, pid, limits, intent, command, self.pid, say)
                self._own(j)
        except FfrtmpError as err:
            raise CallError("JobRefused", str(err), lines=lines) from None
        return {"unit": j.c.unit, "governed": j.error is None, "error": j.error, "lines": lines}

    async def attach(self, p: dict[str, Any]) -> dict[str, Any]:
        self._root()
        self._available()
        lines: list[list[Any]] = []
        try:
            job, limits, intent, store = self._job(p)
            pid = p.get("pid")
            if not isinstance(pid, int):
                raise FfrtmpError(f"invalid PID {pid!r}", 2)
            check_adoptable(pid, self.pid)
            if self.host.agent:
                check_adoptable(pid)  # nor the agent, nor its ancestors
            expected = self.host.expect(pid)  # before the move: its exit is kept from now on
            with self.host.being_made(job), _forgotten_unless_made(self.host, pid, expected):
                j = await adopt(
                    self.host.connect,
                    store,
                    job,
                    pid,
                    limits,
                    intent,
                    bool(p.get("force")),
                    self.pid,
                    self.host.lock,
                    _collect(lines),
                )
                if expected:
                    self.host.expecting.add(j.c.job_id)
                self._own(j)
        except FfrtmpError as err:
            raise CallError("Refused", str(err), status=err.exit_code, lines=lines) from None
        return {"unit": j.c.unit, "lines": lines}

    async def finish(self, p: dict[str, Any]) -> dict[str, Any]:
        job = p.get("job_id")
        j = self.jobs.get(job) if isinstance(job, str) else None
        if j is None:
            raise CallError("NoSuchJob", f"no job {job!r} on this connection")
        self.finishing.add(j.c.job_id)
        lines: list[list[Any]] = []
        j.say = _collect(lines)
        if p.get("exec_errno"):  # it never ran: no record (the client says why)
            j.drop()
            self.host.drop(j)
            return {"result": None, "summary": None, "lines": lines}
        code, sig = p.get("exit_code"), p.get("signal")
        status = (code if isinstance(code, int) else None, sig if isinstance(sig, int) else None)
        r = await self.host.finish(j, status, None)
        if r is None:
            return {"result": None, "summary": None, "lines": lines}
        return {"result": asdict(r), "summary": summary_line(r), "lines": lines}

    def detach(self, p: dict[str, Any]) -> None:
        j = self.jobs.get(str(p.get("job_id")))
        sig = p.get("signal")
        if j is not None:
            j.w.detach(sig if isinstance(sig, int) and sig > 0 else 0)

    def closed(self) -> None:
        """The client went away: what it did not Finish is observed to its end and frozen here."""
        self.gone = True
        for job, j in self.jobs.items():
            if job not in self.finishing:
                self._lost(j)

    def _own(self, j: Job) -> None:
        """A job this connection's Run or Attach made: its client's, or ours if the client went away while
        it was being made (its workload runs in the scope all the same)."""
        self.jobs[j.c.job_id] = j
        self.host.add(j)
        if self.gone:
            self._lost(j)

    def _lost(self, j: Job) -> None:
        note = f"client lost: PID {self.pid} closed its connection before Finish; exit status unknown"
        j.say = _logged(j.c.job_id)
        self.host.spawn(self.host.finish(j, (None, None), note))


@contextlib.contextmanager
def _forgotten_unless_made(host: Host, pid: int, expected: bool) -> Iterator[None]:
    """An attach refused (or failed): its PID's exit event is no longer kept."""
    try:
        yield
    except BaseException:
        if expected and host.events is not None:
            host.events.forget(pid)
        raise


def _collect(lines: list[list[Any]]) -> Callable[[int, str], None]:
    return lambda priority, text: lines.append([priority, text])


def _logged(job: str) -> Callable[[int, str], None]:
    def say(priority: int, text: str) -> None:
        log.log(logging.ERROR if priority <= 3 else logging.WARNING if priority == 4 else logging.INFO, text)

    return say


async def serve(host: Host, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: read calls, answer them in order (a pending one does not stop a oneway Detach)."""
    conn = Conn(host, _peer(writer.get_extra_info("socket")))
    replies: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue()

    async def answer() -> None:
        while (reply := await replies.get()) is not None:
            data = await reply
            with contextlib.suppress(OSError):
                writer.write(data)
                await writer.drain()

    async def one(method: str, p: dict[str, Any]) -> bytes:
        try:
            return varlink.reply(**await conn.call(method, p))
        except CallError as err:
            return varlink.error(err.name, str(err), **err.parameters)
        except (Exception, asyncio.CancelledError) as err:  # a bug here must not take the agent down
            log.exception("ffrtmp: agent: %s failed", method)
            return varlink.error("InternalError", f"{method}: {err!r}")

    answering = asyncio.ensure_future(answer())
    try:
        while True:
            try:
                data = await reader.readuntil(b"\0")
                msg = varlink.decode(data[:-1])
            except (asyncio.IncompleteReadError, OSError):
                break
            except (asyncio.LimitOverrunError, varlink.ProtocolError) as err:  # one error, then closed
                long = isinstance(err, asyncio.LimitOverrunError)
                why = f"longer than {varlink.MAX_MESSAGE} bytes" if long else str(err)
                log.warning("ffrtmp: agent: PID %d: not a varlink message: %s", conn.pid, why)
                replies.put_nowait(_now(varlink.error("InvalidParameter", f"not a varlink message: {why}")))
                break
            method, p = str(msg.get("method", "")), msg.get("parameters")
            p = p if isinstance(p, dict) else {}
            if msg.get("oneway"):
                if method == f"{ERR}Detach":
                    conn.detach(p)
                continue
            replies.put_nowait(asyncio.ensure_future(one(method, p)))
    finally:
        replies.put_nowait(None)
        conn.closed()
        with contextlib.suppress(Exception):
            await answering
        writer.close()


def _now(data: bytes) -> asyncio.Future[bytes]:
    done = asyncio.get_running_loop().create_future()
    done.set_result(data)
    return done


# -- in-process host ----------------------------------------------------------------------------------
def inprocess(user: bool = False) -> socket.socket:
    """The client's end of a socketpair whose other end this process serves in a daemon thread, with the
    agent's own handler (own event loop, own bus with a match per unit, no signal handlers). `user`: the
    calling user's own manager (its bus), as `--user` says."""
    if user and not on_user_bus():
        use_user_bus()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    serve_it = threading.Thread(target=lambda: asyncio.run(_inprocess(theirs)), name="ffrtmp-govern")
    serve_it.daemon = True
    serve_it.start()
    return ours


async def _inprocess(sock: socket.socket) -> None:
    host = Host(None, None, agent=False)
    try:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=varlink.MAX_MESSAGE)
        await serve(host, reader, writer)
        while host.tasks:
            await asyncio.gather(*host.tasks, return_exceptions=True)
    finally:
        if host.bus is not None:
            host.bus.close()


# -- the agent --------------------------------------------------------------------------------------
def _listening(path: str | None) -> socket.socket:
    """The socket systemd passed (LISTEN_FDS), else one made at `path` (0600, for trying)."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(k, None)
        return socket.socket(fileno=3)
    if path is None:
        raise FfrtmpError("no socket: not socket-activated and no --socket PATH given", 2)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if Path(path).is_socket():  # a dead agent's is replaced; a live one's is not taken over
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
            sock.close()
            raise FfrtmpError(f"an agent already listens on {path}")
        os.unlink(path)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise FfrtmpError(f"cannot listen on {path}: {err.strerror or err}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def main(socket_path: str | None, store: Store, listen: str, rules: Path | None = None) -> int:
    """`ffrtmp agent`: serve until the bus is lost and no job is left (socket activation starts anew).
    `listen`: HOST:PORT of the exporter's endpoints, or `none`; `rules`: watch rules to adopt by."""
    if listen != "none":
        from .httpd import parse_listen

        parse_listen(listen)  # a usage error before anything else
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return asyncio.run(_agent(_listening(socket_path), store, listen, rules))


async def _metrics(listen: str, store: Store, bus: Bus) -> Endpoints | None:
    """The exporter's endpoints in this loop. Governance does not depend on them: if they cannot be
    served (the port taken, the state directory refused) the agent says so and governs all the same."""
    if listen == "none":
        return None
    from .endpoints import serve_http

    try:
        return await serve_http(listen, store, lambda: bus if bus.connected else None)
    except FfrtmpError as err:
        log.error("ffrtmp: agent: not serving metrics on %s: %s", listen, err)
        return None


def _watch(rules: Path | None, host: Host, store: Store, resumed: list[Job]) -> Callable[[], None]:
    """Watch mode in the agent (discover.py): every new process a rule matches adopted as `attach` would,
    with its real exit status, as are the agent's attach jobs and the `resumed` ones; the closer.
    Governance of clients does not depend on it: if the rules or the process events cannot be had, the
    agent says so once and governs all the same."""
    if rules is None:
        return lambda: None
    from .discover import Watcher, adopt
    from .procevents import ProcEvents
    from .rules import load

    try:
        found, source = load(rules), ProcEvents()
    except FfrtmpError as err:
        log.error("ffrtmp: agent: not watching: %s", err)
        return lambda: None
    loop = asyncio.get_running_loop()
    never: asyncio.Future[int] = loop.create_future()  # the agent detaches nothing: its jobs go on without it
    w = Watcher(found, lambda c: adopt(host, store, c, w.exit_status, never), source)
    host.events = w
    for j in resumed:  # run or attach; an exit before the subscription was not seen: status unknown
        if host.expect(j.c.pid):
            host.expecting.add(j.c.job_id)
    source.listen(loop, w.on_events)  # subscribed before the /proc pass: nothing starts unseen in between
    w.scan()
    log.info("ffrtmp: agent: watching by %d rules of %s", len(found.rules), found.path)
    return source.close


async def _agent(listen: socket.socket, store: Store, http: str, rules: Path | None = None) -> int:
    try:
        bus = await Bus.connect(broad=True)
    except BusError as err:
        listen.close()
        raise FfrtmpError(f"cannot reach systemd: {err}") from None
    host = Host(bus, asyncio.Lock(), agent=True)
    host.idle.set()
    endpoints = await _metrics(http, store, bus)
    unreadable = endpoints.unreadable if endpoints is not None else (lambda job: None)
    reconciler = Reconciler(store, bus, unreadable, observed=host.observing)
    unwatch: Callable[[], None] = lambda: None  # noqa: E731
    try:
        resumed = await _resume(bus, store)
        for j in resumed:
            host.add(j)  # observed (its watch follows it): the Reconciler leaves it alone
        await bus.on_unit_removed(reconciler.unit_removed)
        await reconciler.reconcile_all()
        unwatch = _watch(rules, host, store, resumed)
        for j in resumed:  # once its exit event may be expected
            host.spawn(host.finish(j, (None, None), None))
        listen.setblocking(False)
        server = await asyncio.start_unix_server(
            lambda r, w: serve(host, r, w), sock=listen, limit=varlink.MAX_MESSAGE
        )
        from .exporter import notify_ready

        notify_ready()
        log.info("ffrtmp: agent ready (%d jobs resumed)", len(host.jobs))
        with contextlib.suppress(Exception):  # how it broke is in bus.lost
            await bus.disconnected()
        unwatch()  # no more adoptions without a bus
        n = len(host.jobs)
        log.warning("ffrtmp: agent: %s; observing %d jobs to their end, then exiting", bus.lost, n)
        await host.idle.wait()
        while host.tasks:
            await asyncio.gather(*host.tasks, return_exceptions=True)
        server.close()
        return 0
    finally:
        unwatch()
        reconciler.close()
        if endpoints is not None:
            endpoints.close()
        bus.close()


async def _resume(bus: Bus, store: Store) -> list[Job]:
    """Live jobs of the state dir whose client is gone and whose workload (the same process) still runs."""
    out = []
    for job in store.ids(store.jobs):
        try:
            c = store.contract(job)
        except (BadRecord, FfrtmpError):
            continue
        if c is None or wrapper_alive(c):
            continue
        j = await resume(bus, store, c, workload_alive, _logged(job))
        if j is not None:
            log.info("ffrtmp: job %s: resumed (its client is gone, PID %d runs)", job, c.pid)
            out.append(j)
    return out
