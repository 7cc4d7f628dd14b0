"""The agent's wire: varlink's framing (one JSON object per message, ended by a NUL byte) on a unix
socket, the socket's path, the method names. Standard library only: the thin clients import it. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

# Protocol (interface io.ffrtmp.Agent; a call is {"method": M, "parameters": {...}} and, for a call that
# gets no reply, "oneway": true; a reply is {"parameters": {...}} or {"error": NAME, "parameters":
# {"message": TEXT}}; calls on one connection are answered in order, a pending call does not stop a
# later oneway one from being read):
#   Run     {job_id, pid, limits, intent, command, state_dir}  -> {unit, governed, error, lines}
#           pid: the caller's child, waiting for its go; the agent writes the contract (the caller is its
#           wrapper), makes the scope and follows it before it replies; governed false: the workload
#           runs all the same (error says why). Errors: JobRefused (the caller stops its child, 125).
#   Attach  {job_id, pid, limits, intent, force, state_dir}     -> {unit, lines}
#           Errors: Refused {message, status}: nothing was moved (status 1 or 2, as in-process).
#   Finish  {job_id, exit_code, signal, exec_errno}             -> {result, summary, lines}
#           after the workload's end as the caller saw it (attach: exit_code and signal null); returns
#           once the agent has seen the end too and frozen the record (result: its JSON object; summary:
#           its summary line, which the caller says; both null when there is no record: exec_errno set,
#           the exec failed and the contract is dropped).
#   Detach  {job_id, signal}, oneway                            -> a pending Finish replies, detached
#   lines: [[PRIORITY, TEXT], ...] what the job's wrapper says on its stderr and to the journal (syslog
#   priorities 3 error, 4 warning, 6 info). A connection closed before Finish: the agent observes the job
#   to its end and freezes it itself (exit status unknown). Peers are told apart by SO_PEERCRED: only
#   uid 0 may call Run or Attach (PermissionDenied), and Run's pid must be the peer's own child.
#   Other errors: Unavailable (the agent lost its bus: govern in-process), InvalidParameter, NoSuchJob
#   (Finish of a job not Run/Attached on this connection), MethodNotFound, InternalError; JobRefused and
#   Refused carry `lines` too. A message that is not a JSON object (UTF-8) ended by a NUL within MAX_MESSAGE
#   bytes is answered InvalidParameter ("not a varlink message: ...") and its connection is closed.

from __future__ import annotations

import json
import os
import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

INTERFACE = "io.ffrtmp.Agent"
SOCKET = "/run/ffrtmp/agent.sock"
MAX_MESSAGE = 1 << 20  # bytes: a longer message is a protocol error, not a memory hog


class ProtocolError(Exception):
    """The peer broke the framing (no NUL within MAX_MESSAGE, not a JSON object) or hung up."""


def socket_path() -> str | None:
    """Where the agent listens; FFRTMP_AGENT_SOCKET overrides it, and set empty or `none` it means no
    agent (govern in-process)."""
    path = os.environ.get("FFRTMP_AGENT_SOCKET", SOCKET)
    return None if path in ("", "none") else path


def encode(message: dict[str, Any]) -> bytes:
    """ASCII JSON: argument bytes that are not UTF-8 travel as their surrogate escapes and come back."""
    return json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode() + b"\0"


def decode(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data.decode())  # UTF-8, as varlink says (json.loads would guess UTF-16 too)
    except ValueError as err:  # UnicodeDecodeError is one
        raise ProtocolError(f"not JSON: {err}") from None
    except RecursionError:
        raise ProtocolError("not JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise ProtocolError("not a JSON object")
    return message


def call(method: str, oneway: bool = False, **parameters: Any) -> bytes:
    message: dict[str, Any] = {"method": f"{INTERFACE}.{method}", "parameters": parameters}
    if oneway:
        message["oneway"] = True
    return encode(message)


def reply(**parameters: Any) -> bytes:
    return encode({"parameters": parameters})


def error(name: str, message: str, **parameters: Any) -> bytes:
    return encode({"error": f"{INTERFACE}.{name}", "parameters": {"message": message, **parameters}})


class Connection:
    """A blocking client end: send a message, read the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            if len(self._buf) > MAX_MESSAGE:
                raise ProtocolError("message too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolError("the agent hung up")
            self._buf += chunk
        data, _, self._buf = self._buf.partition(b"\0")
        return decode(data)

    def close(self) -> None:
        self.sock.close()
