"""The thin client (the `ffrtmp` entry point): `run` and `attach` read and driven with the standard library
only, their governance asked of the node agent (or of this process's own host of it); --help, --version,
every other command and every usage error are the typer CLI's (cli.py). Client side ONLY.
While the agent answers, nothing heavier than it needs is imported (no dataclasses, pathlib, datetime,
typing, records or store: a waiting client's memory is per job); the paths without it import them."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import sys
import time

from . import journal, varlink
from .errors import (
    RUN_CANNOT_EXECUTE,
    RUN_NOT_FOUND,
    RUN_WRAPPER_ERROR,
    USAGE,
    FfrtmpError,
    StateError,
    UsageError,
)
from .limits import parse_limits
from .names import check_intent, unit_name
from .names import job_id as make_id
from .proc import check_adoptable

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: imported where a path without the agent needs them
    from datetime import datetime
    from pathlib import Path
    from typing import Any

    from .report.result import Contract, Result
    from .report.store import Store

STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # to the wrapper: detach, never the workload's
GO, ABORT = b"g", b"x"
DEFAULT_STATE = "/var/lib/ffrtmp"
VALUES = {"--job-id", "--cpu-max", "--cpu-quota", "--cpu-weight", "--memory-max", "--io-weight", "--io-max"}
VALUES |= {"--intent", "--state-dir"}
ELSEWHERE = ("Unavailable", "PermissionDenied", "MethodNotFound")  # the agent cannot: govern in-process


# -- the command line ---------------------------------------------------------------------------------
def parse(argv: list[str]) -> dict[str, Any] | None:
    """`[--user] run|attach OPTIONS...` read as the typer CLI reads it (click's rules: `--opt VALUE` takes
    the next word whatever it is, or `--opt=VALUE`; the last of a repeated option wins, `--io-max` adds
    up; `--` ends the options; run's first word that is not an option starts its command). None for
    anything else: the typer CLI's to read, answer or refuse."""
    user = argv[:1] == ["--user"]
    words = argv[1:] if user else list(argv)
    if not words or words[0] not in ("run", "attach"):
        return None
    cmd, rest = words[0], words[1:]
    flags = ("--force", "--json") if cmd == "attach" else ()
    takes = VALUES | ({"--pid"} if cmd == "attach" else set())
    o: dict[str, Any] = {"cmd": cmd, "user": user, "--io-max": []}
    while rest:
        word = rest.pop(0)
        if word == "--":
            break
        if word[:1] != "-" or word == "-":
            rest.insert(0, word)
            break
        name, eq, value = word.partition("=")
        if name in flags and not eq:
            o[name] = True
            continue
        if name not in takes or not (eq or rest):
            return None
        value = value if eq else rest.pop(0)
        if name == "--io-max":
            o[name].append(value)
        else:
            o[name] = value
    if o.get("--state-dir") == "":
        return None
    if cmd == "run":
        o["command"] = rest
        return o if rest else None
    try:
        o["--pid"] = int(o["--pid"])
    except (KeyError, ValueError):
        return None
    return None if rest else o


def state_dir_of(given: str | Path | None, user: bool) -> str:
    """The state directory as an absolute path (as pathlib's `absolute()`: `..` kept), resolved once here:
    a record never depends on a working directory."""
    given = str(given or "") or os.environ.get("FFRTMP_STATE_DIR") or None
    if given is None and user:
        state = os.environ.get("XDG_STATE_HOME") or ""
        base = state if state.startswith("/") else os.path.join(os.path.expanduser("~"), ".local", "state")
        given = os.path.join(base, "ffrtmp")
    path = os.path.join(os.getcwd(), given or DEFAULT_STATE)
    return "/" + "/".join(part for part in path.split("/") if part not in ("", "."))


def store_at(state_dir: str) -> Store:
    from pathlib import Path

    from .report.store import Store

    return Store(Path(state_dir))


def store_of(given: str | Path | None, user: bool) -> Store:
    return store_at(state_dir_of(given, user))


def say(line: str, priority: int = 6, **fields: object) -> None:
    """One line in the journal (syslog PRIORITY, more fields) and on our own stderr (fd 2), never
    elsewhere; whether it arrives changes nothing. Journal first: who reads the line, finds the entry."""
    journal.send(line, priority, **fields)
    with contextlib.suppress(OSError):
        os.write(2, f"{line}\n".encode(errors="backslashreplace"))


def summary(line: str, r: dict[str, Any]) -> None:
    """The summary line of the record `r` (its JSON object); its journal entry carries the verdict."""
    ok = r.get("platform_sla_compliant") is True
    say(
        line,
        6 if ok else 4,
        FFRTMP_VERDICT="compliant" if ok else "violation",
        FFRTMP_REASON=r.get("platform_sla_reason"),
        FFRTMP_EXIT_CODE=r.get("exit_code"),
        FFRTMP_SIGNAL=r.get("signal"),
        FFRTMP_GOVERNED=int(r.get("governed") is True),
        FFRTMP_RUNTIME_SECONDS=r.get("processing_seconds"),
    )


def summary_of(r: Result) -> dict[str, Any]:
    """A record frozen here: its summary said; its JSON object."""
    from dataclasses import asdict

    from .presentation import summary_line

    d = asdict(r)
    summary(summary_line(r), d)
    return d


def print_json(r: dict[str, Any]) -> None:
    """`--json`: the record exactly as `show --json` prints it."""
    from .report.result import Result, from_json, to_json

    print(to_json(from_json(Result, json.dumps(r))), end="")


def hold_std_fds() -> None:
    """A closed fd 0-2 is held by /dev/null (close-on-exec): no file of ours lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


def _typer() -> None:
    from .cli import main as typer_main

    typer_main()


def main() -> None:
    hold_std_fds()
    o = None if "_FFRTMP_COMPLETE" in os.environ else parse(sys.argv[1:])  # completion: typer's
    if o is None:
        return _typer()
    sys.stderr = None  # only say() writes there: never a stray traceback
    run = o["cmd"] == "run"
    try:
        limits = parse_limits(
            o.get("--cpu-max"), o.get("--cpu-quota"), o.get("--cpu-weight"), o.get("--memory-max"),
            o.get("--io-weight"), o["--io-max"],
        )  # fmt: skip
        job = make_id(o.get("--job-id"))
        journal.bind(FFRTMP_JOB_ID=job, FFRTMP_MODE=o["cmd"])
        intent = check_intent(o.get("--intent"))
        if not run and o["--pid"] <= 0:
            return _typer()
    except UsageError:  # said, with its status, by the CLI that documents them
        return _typer()
    except FfrtmpError as err:
        say(f"ffrtmp: {err}", 3)
        sys.exit(err.exit_code)
    if o["user"]:
        journal.unit_field = "USER_UNIT"
    state = state_dir_of(o.get("--state-dir"), o["user"])
    try:
        if run:
            code = run_job(o["command"], job, limits.as_dict(), intent, state, o["user"])
        else:
            ask = (o["--pid"], job, limits.as_dict(), intent, bool(o.get("--force")), state, o["user"])
            result = attach_job(*ask)
            if o.get("--json") and result is not None:
                print_json(result)
            code = 0
    except FfrtmpError as err:
        say(f"ffrtmp: {err}", 3)
        code = (RUN_WRAPPER_ERROR if run else USAGE) if err.exit_code == USAGE else err.exit_code
    except Exception as err:  # anything unexpected: one line, never a traceback
        say(f"ffrtmp: internal error: {err!r}", 3)
        code = RUN_WRAPPER_ERROR if run else 1
    sys.exit(code)


# -- the connection -------------------------------------------------------------------------------------
class Refusal(Exception):
    """The call was answered with an error: its short NAME, message and parameters."""

    def __init__(self, name: str, parameters: dict[str, Any]) -> None:
        super().__init__(str(parameters.get("message", name)))
        self.name, self.parameters = name, parameters


class Agent:
    """The connection to whoever governs: the node agent, or this process's own host of its handler."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.conn, self.where = varlink.Connection(sock), where
        self.lost: float | None = None  # when (time.time()) the connection broke after its call was answered

    @classmethod
    def connect(cls, user: bool) -> Agent:
        """The agent at varlink.socket_path(); none there (or --user): this process hosts the handler."""
        path = None if user else varlink.socket_path()
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock, "agent")
            except OSError as err:
                sock.close()
                if err.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EACCES):
                    raise
        return cls.inprocess(user)

    @classmethod
    def inprocess(cls, user: bool) -> Agent:
        from .agent import inprocess

        if user:
            from .systemd.bus import on_user_bus, use_user_bus

            if not on_user_bus():
                use_user_bus()
        return cls(inprocess(user), "in-process")

    def call(self, method: str, **parameters: Any) -> dict[str, Any]:
        """One call and its reply (Refusal for an error); ProtocolError or OSError: the connection broke."""
        self.send(method, **parameters)
        return self.reply()

    def send(self, method: str, oneway: bool = False, **parameters: Any) -> None:
        self.conn.send(varlink.call(method, oneway, **parameters))

    def reply(self) -> dict[str, Any]:
        m = self.conn.receive()
        p = m.get("parameters")
        p = p if isinstance(p, dict) else {}
        if "error" in m:
            raise Refusal(str(m["error"]).removeprefix(f"{varlink.INTERFACE}."), p)
        return p

    def broke(self) -> None:
        self.lost = self.lost or time.time()
        self.close()

    def fileno(self) -> int:
        return self.conn.sock.fileno()

    def close(self) -> None:
        self.conn.close()


def lines(p: dict[str, Any]) -> None:
    """What the governing side says for the job: on our stderr and in the journal, from this process."""
    for line in p.get("lines") or ():
        with contextlib.suppress(TypeError, ValueError):
            priority, text = line
            say(str(text), int(priority))


def finished(p: dict[str, Any]) -> dict[str, Any] | None:
    """Finish's reply: its lines and the record's summary line said; the record's JSON object (None: none)."""
    lines(p)
    r = p.get("result")
    if not isinstance(r, dict):
        return None
    line = p.get("summary")
    if not isinstance(line, str):  # an agent that does not say it
        from .presentation import summary_line
        from .report.result import Result, from_json

        line = summary_line(from_json(Result, json.dumps(r)))
    summary(line, r)
    return r


class Stops:
    """SIGINT/SIGTERM/SIGHUP noted, never acted on by Python; `fd` readable when one came (whichever
    thread the kernel gave it to: the wake-up byte is written by the C handler)."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.noted: list[int] = []
        self._old = signal.set_wakeup_fd(self._w)
        for sig in STOPS:
            signal.signal(sig, lambda s, _f: self.noted.append(s))

    def drain(self) -> int | None:
        with contextlib.suppress(OSError):
            os.read(self.fd, 64)
        return self.noted[0] if self.noted else None

    def close(self) -> None:  # the handlers stay: a stop after the end changes nothing
        if self._w >= 0:
            signal.set_wakeup_fd(self._old)
            os.close(self.fd)
            os.close(self._w)
            self._w = -1


def wait(*fds: int) -> int:
    """Block (no timeout, no wakeup) until one of `fds` is readable or hung up; that fd."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return poller.poll()[0][0]


def utc(t: float) -> datetime:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC)


def lost_note(unit: str, at: float) -> str:
    from .report.result import rfc3339

    why = f"agent connection lost at {rfc3339(utc(at))}"
    return f"observation of {unit} lost, end time is the exit as seen here: {why}"


def freeze_here(
    store: Store, c: Contract, governed: bool, error: str | None, job: str, end: float, **outcome: Any
) -> Result:
    """The record frozen by this process (the agent is gone, or there is none): once. If it was frozen
    already (the agent did, before it went), that one. `outcome`: Outcome's other fields (times as
    time.time())."""
    from .report.result import Outcome, freeze

    for k in ("start_time", "attach_time"):
        if k in outcome:
            outcome[k] = utc(outcome[k])
    o = Outcome(utc(end), **outcome)
    result, err = store.freeze_job(c, lambda c: freeze(c, o, governed, error))
    if err is not None:
        with contextlib.suppress(FfrtmpError):
            if (earlier := store.result(job)) is not None:
                return earlier
        say(f"ffrtmp: job {job}: result not saved: {err}", 3)
    return result


def contract(
    job: str, mode: str, pid: int, limits: dict[str, Any], intent: str | None, t: float, **kw: Any
) -> Contract:
    """The job's contract as the governing side writes it (this process is its wrapper): made here only
    when this process must write or freeze it."""
    from .report.result import contract

    return contract(job, mode, pid, limits, intent, utc(t), **kw)


# -- run ----------------------------------------------------------------------------------------------
def _child(cmd: list[str], go: int, report: int) -> None:
    try:
        os.setpgid(0, 0)
        if os.read(go, 1) == ABORT:
            os._exit(RUN_WRAPPER_ERROR)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored by Python at its start, not by a shell
            signal.signal(sig, signal.SIG_DFL)
        os.execvp(cmd[0], cmd)
    except (OSError, ValueError) as err:  # ValueError: an empty command name, not found
        num = getattr(err, "errno", None) or errno.ENOENT
        os.write(report, str(num).encode())
        os._exit(RUN_NOT_FOUND if num == errno.ENOENT else RUN_CANNOT_EXECUTE)
    finally:
        os._exit(RUN_WRAPPER_ERROR)


def _take_terminal(pid: int) -> bool:
    with contextlib.suppress(OSError):
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(0, pid)
            return True
    return False


def _status(pid: int) -> tuple[int | None, int | None]:
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return (status, None) if status >= 0 else (None, -status)


def run_job(
    cmd: list[str], job: str, limits: dict[str, Any], intent: str | None, state: str, user: bool
) -> int:
    """Fork the workload (its own process group, waiting on a pipe), have it governed, let it go, wait,
    have its record frozen; its exit status (128+N: killed by signal N, or told by N to detach).
    `limits`: as the record keeps them; `state`: the absolute state directory."""
    t = time.time()
    go_r, go = os.pipe()
    report_r, report = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go)
        os.close(report_r)
        _child(cmd, go_r, report)
    os.close(go_r)
    os.close(report)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    tty = _take_terminal(pid)
    fds = [go, report_r]
    agent: Agent | None = None
    stops: Stops | None = None
    j = Run(job, pid, cmd, limits, intent, state, t)
    try:
        try:  # everything this process needs is taken before the go: a failure here stops the child
            fds.append(os.pidfd_open(pid))
            stops = Stops()
            agent, p = _start(j, user)
        except BaseException as err:
            with contextlib.suppress(OSError):  # the child is gone already
                os.write(go, ABORT)
            os.waitpid(pid, 0)
            while fds:  # closed now: what follows needs descriptors under a low `ulimit -n`
                os.close(fds.pop())
            why = str(err) if isinstance(err, Refusal | FfrtmpError) else f"job {job} not started: {err}"
            raise FfrtmpError(why, RUN_WRAPPER_ERROR) from None
        return _go(agent, p, j, fds, stops)
    finally:
        for fd in fds:
            os.close(fd)
        if stops is not None:
            stops.close()
        if agent is not None and agent.lost is None:
            agent.close()
        if tty:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(0, os.getpgrp())


class Run:
    """What this process knows of its run job; its contract is made only where this process writes or
    freezes it (no agent, or the agent lost)."""

    def __init__(
        self,
        job: str,
        pid: int,
        cmd: list[str],
        limits: dict[str, Any],
        intent: str | None,
        state: str,
        t: float,
    ) -> None:
        self.job, self.pid, self.cmd, self.limits, self.intent = job, pid, cmd, limits, intent
        self.state, self.t, self.unit = state, t, unit_name(job)

    def contract(self) -> Contract:
        return contract(self.job, "run", self.pid, self.limits, self.intent, self.t, command=self.cmd)

    def store(self) -> Store:
        return store_at(self.state)


def _start(j: Run, user: bool) -> tuple[Agent | None, dict[str, Any]]:
    """The scope made and followed before the go (or why not). Agent None: there is no one to govern
    (no bus): this process claims the contract and freezes the record, as ungoverned."""
    job, pid = j.job, j.pid
    agent = Agent.connect(user)
    for _ in range(2):
        try:
            return agent, agent.call("Run", job_id=job, pid=pid, limits=j.limits, intent=j.intent,
                                     command=j.cmd, state_dir=j.state)  # fmt: skip
        except Refusal as r:
            if r.name == "JobRefused":
                lines(r.parameters)
                raise
            agent.close()
            if agent.where == "agent" and r.name in ELSEWHERE:  # the agent cannot: this process can
                agent = Agent.inprocess(user)
                continue
            if r.name != "Unavailable":
                raise FfrtmpError(f"job {job} not started: {r}", RUN_WRAPPER_ERROR) from None
            why = str(r.parameters.get("error") or str(r).removeprefix("cannot reach systemd: "))
            try:
                j.store().claim(j.contract())
            except StateError as err:  # disk trouble fails the record, never the workload
                say(f"ffrtmp: job {job}: contract not saved, the workload runs all the same: {err}", 3)
            return None, {"unit": j.unit, "governed": False, "error": why, "lines": []}
        except (varlink.ProtocolError, OSError) as err:  # lost before its answer: maybe a scope, no go
            with contextlib.suppress(FfrtmpError):
                store = j.store()
                if (mine := store.contract(job)) is not None and mine.pid == pid:
                    store.drop_contract(job)
            why = f"job {job} not started: agent connection lost: {err}"
            raise FfrtmpError(why, RUN_WRAPPER_ERROR) from None
    raise AssertionError("unreachable")


def _go(agent: Agent | None, p: dict[str, Any], j: Run, fds: list[int], stops: Stops) -> int:
    go, report_r, pidfd = fds
    job, pid, unit = j.job, j.pid, str(p.get("unit") or j.unit)
    with contextlib.suppress(BrokenPipeError):  # killed before its exec (its scope stopped): observed
        os.write(go, GO)
    os.close(fds.pop(0))
    try:
        failed = os.read(report_r, 16)  # b"": the exec closed it
        os.close(fds.pop(0))
    except OSError:
        failed = b""
    if failed:
        num = int(failed)
        lines(p)
        if agent is not None:
            try:
                lines(agent.call("Finish", job_id=job, exit_code=None, signal=None, exec_errno=num))
            except (Refusal, varlink.ProtocolError, OSError):
                agent.broke()
        with contextlib.suppress(FfrtmpError):  # the agent drops it; without one, so do we
            if agent is None or agent.lost:
                j.store().drop_contract(job)
        os.waitpid(pid, 0)
        status = RUN_NOT_FOUND if num == errno.ENOENT else RUN_CANNOT_EXECUTE
        raise FfrtmpError(f"cannot execute {j.cmd[0]!r}: {os.strerror(num)}", status)
    started = time.time()
    try:
        if p.get("governed"):
            journal.bind_unit(unit, pid)
            say(f"ffrtmp: job {job} started in {unit} (pid {pid}, {agent.where if agent else 'in-process'})")
        else:
            say(f"ffrtmp: job {job} runs UNGOVERNED (pid {pid}): {p.get('error')}", 4)
        lines(p)
        return _watch_run(agent, p, j, pidfd, stops, started)
    except Exception as err:  # after the go: the status is the workload's, whatever fails here
        say(f"ffrtmp: job {job}: observation failed, waiting for the workload: {err!r}", 3)
        code, sig = _status(pid)
        return code if code is not None else 128 + (sig or 0)


def _watch_run(
    agent: Agent | None, p: dict[str, Any], j: Run, pidfd: int, stops: Stops, started: float
) -> int:
    job, pid = j.job, j.pid
    detach: int | None = None
    while True:
        fds = (pidfd, stops.fd, *([agent.fileno()] if agent is not None and agent.lost is None else []))
        ready = wait(*fds)
        if ready == pidfd:
            break
        if ready == stops.fd:
            detach = stops.drain()
            if detach is not None:
                break
        else:  # the agent said something unasked, or hung up: lost, no reconnect
            agent.broke()  # type: ignore[union-attr]
    end = time.time()
    code, sig = (None, None) if detach is not None else _status(pid)
    exit_status = code if code is not None else 128 + (sig or detach or 0)
    if agent is not None and agent.lost is None:
        try:
            agent.send("Finish", job_id=job, exit_code=code, signal=sig, exec_errno=None)
            if detach is not None:
                agent.send("Detach", oneway=True, job_id=job, signal=detach)
            finished(agent.reply())
            return exit_status
        except (varlink.ProtocolError, OSError, Refusal):
            agent.broke()
    governed = bool(p.get("governed"))
    error = p.get("error") if not governed else None
    if agent is not None and agent.lost is not None and governed:
        error = lost_note(str(p.get("unit") or j.unit), agent.lost)
        say(f"ffrtmp: job {job}: {error}", 4)
    o = dict(exit_code=code, signal=sig, detached=detach is not None, start_time=started)
    summary_of(freeze_here(j.store(), j.contract(), governed, error, job, end, **o))
    return exit_status


# -- attach -------------------------------------------------------------------------------------------
def attach_job(
    pid: int, job: str, limits: dict[str, Any], intent: str | None, force: bool, state: str, user: bool
) -> dict[str, Any] | None:
    """Adopt PID into a new scope (the agent does), observe it to its end (the agent does, this process
    waits on the socket) and the record (its JSON object); without the agent after the adoption, this
    process watches the PID and freezes the record."""
    check_adoptable(pid)
    try:
        pidfd = os.pidfd_open(pid)  # pins the process: a reused PID cannot be mistaken for it
    except ProcessLookupError:
        raise FfrtmpError(f"no process with PID {pid}") from None
    stops: Stops | None = None
    agent: Agent | None = None
    try:
        stops = Stops()
        agent = Agent.connect(user)
        ask = dict(job_id=job, pid=pid, limits=limits, intent=intent, force=force, state_dir=state)
        for _ in range(2):
            try:
                p = agent.call("Attach", **ask)
                break
            except Refusal as r:
                if agent.where == "agent" and r.name in ELSEWHERE:
                    agent.close()
                    agent = Agent.inprocess(user)
                    continue
                lines(r.parameters)
                status = r.parameters.get("status")
                raise FfrtmpError(str(r), status if isinstance(status, int) else 1) from None
            except (varlink.ProtocolError, OSError) as err:
                why = f"agent connection lost: {err}; contract kept for reconcile"
                raise FfrtmpError(f"PID {pid} may or may not be adopted: {why}") from None
        attached = time.time()
        unit = str(p.get("unit") or unit_name(job))
        journal.bind_unit(unit, pid)
        lines(p)
        return _watch_attach(agent, unit, pid, pidfd, stops, state, job, attached)
    finally:
        os.close(pidfd)
        if stops is not None:
            stops.close()
        if agent is not None and agent.lost is None:
            agent.close()


def _watch_attach(
    agent: Agent, unit: str, pid: int, pidfd: int, stops: Stops, state: str, job: str, attached: float
) -> dict[str, Any] | None:
    detach: int | None = None
    try:
        agent.send("Finish", job_id=job, exit_code=None, signal=None, exec_errno=None)
        while wait(agent.fileno(), stops.fd) == stops.fd:  # the reply comes at the end (or detached)
            sig = stops.drain()
            if detach is None and sig is not None:
                detach = sig
                agent.send("Detach", oneway=True, job_id=job, signal=detach)
        return finished(agent.reply())
    except (varlink.ProtocolError, OSError, Refusal):
        agent.broke()
    while detach is None and wait(pidfd, stops.fd) == stops.fd:  # no agent: the pidfd says when it ends
        detach = stops.drain()
    assert agent.lost is not None
    note = lost_note(unit, agent.lost)
    say(f"ffrtmp: job {job}: {note}", 4)
    store = store_at(state)
    c = store.contract(job)
    if c is None:
        earlier = store.result(job)
        return None if earlier is None else summary_of(earlier)
    o = dict(detached=detach is not None, attach_time=attached)
    return summary_of(freeze_here(store, c, True, note, job, time.time(), **o))
