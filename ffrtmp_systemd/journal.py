"""The journal: each line the wrapper says also goes to journald as one structured entry. ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

# systemd's native protocol (systemd-journald.service(8), "Native Journal Protocol"): one datagram
# of KEY=value lines to journald's socket; a value holding a newline goes as KEY\n<u64 LE length><bytes>\n.
# Sent without blocking; no journal (no socket), a full queue or any error drops the entry, silently.

from __future__ import annotations

import os
import socket
import struct

SOCKET = os.environ.get("FFRTMP_JOURNAL_SOCKET") or "/run/systemd/journal/socket"  # a test hook
_fields: dict[str, str] = {"SYSLOG_IDENTIFIER": "ffrtmp"}
# How an entry is tied to a unit so that `journalctl -u` and `systemctl status` show it: journalctl
# honours OBJECT_SYSTEMD_UNIT= from root only (_UID=0), USER_UNIT= from the user manager's owner.
unit_field = "OBJECT_SYSTEMD_UNIT"


def bind(**fields: object) -> None:
    """Fields that every later entry of this process carries (FFRTMP_JOB_ID, the unit...)."""
    _fields.update({k: str(v) for k, v in fields.items() if v is not None})


def bind_unit(unit: str, pid: int) -> None:
    """Our scope exists: from now on the entries are shown under it."""
    bind(**{unit_field: unit, "FFRTMP_UNIT": unit, "FFRTMP_PID": pid})


def _field(key: str, value: str) -> bytes:
    data = value.encode(errors="backslashreplace")
    if b"\n" in data:
        return b"%s\n%s%s\n" % (key.encode(), struct.pack("<Q", len(data)), data)
    return b"%s=%s\n" % (key.encode(), data)


def send(message: str, priority: int, **fields: object) -> None:
    """One entry: MESSAGE, PRIORITY (syslog's 0-7), the bound fields and these. Never blocks, never fails.
    Only a job's lines: the exporter's (a service: its stderr is in the journal already) are not sent."""
    if "FFRTMP_JOB_ID" not in _fields:
        return
    entry = {**_fields, **{k: str(v) for k, v in fields.items() if v is not None}}
    entry.update(MESSAGE=message, PRIORITY=str(priority))
    try:  # a socket per entry, closed at once: no descriptor held (a low `ulimit -n` needs them all)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(b"".join(_field(k, v) for k, v in entry.items()), SOCKET)
    except (OSError, ValueError):
        pass
