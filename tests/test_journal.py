"""The wrapper's lines as journal entries (systemd's native protocol), and nothing changed without a journal.

journald itself is in tests/test_vm_ops.py (the VM); here a datagram socket of the test stands where
journald's would, so the entries' bytes and fields are checked, and a full one must not block.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import re
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import Sandbox

SUMMARY = re.compile(r"JOB (\S+) \| mode=run \| .* \| unit=ffrtmp-\1\.scope$")


def _entry(data: bytes) -> dict[str, str]:
    """One datagram of the native protocol: KEY=value lines, or KEY\\n<u64 LE length><value>\\n."""
    out, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = end + 1
        else:
            key, (size,) = line, struct.unpack("<Q", data[end + 1 : end + 9])
            value, i = data[end + 9 : end + 9 + size], end + 10 + size
        out[key.decode()] = value.decode()
    return out


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    path.chmod(0o666)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def _ffrtmp(sandbox: Sandbox, state_dir: Path, sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"FFRTMP_STATE_DIR": str(state_dir), "FFRTMP_JOURNAL_SOCKET": str(sock)}
    return sandbox.run(["ffrtmp", *args], env=env, timeout=60)


def _received(sock: socket.socket) -> list[dict[str, str]]:
    out = []
    while True:
        try:
            out.append(_entry(sock.recv(1 << 16)))
        except BlockingIOError:
            return out


def test_each_line_is_an_entry_with_the_jobs_fields(
    sandbox: Sandbox, state_dir: Path, journal: tuple[Path, socket.socket]
) -> None:
    path, sock = journal
    r = _ffrtmp(
        sandbox, state_dir, path, "run", "--job-id", "jj", "--cpu-quota", "50", "--", "sh", "-c", "exit 3"
    )
    assert r.returncode == 3, r.stderr
    entries = _received(sock)
    assert [e["MESSAGE"] for e in entries] == r.stderr.splitlines()
    start, summary = entries
    for e in entries:
        assert e["SYSLOG_IDENTIFIER"] == "ffrtmp" and e["FFRTMP_JOB_ID"] == "jj" and e["FFRTMP_MODE"] == "run"
        assert e["OBJECT_SYSTEMD_UNIT"] == e["FFRTMP_UNIT"] == "ffrtmp-jj.scope" and int(e["FFRTMP_PID"]) > 1
    assert start["PRIORITY"] == "6" and "started in ffrtmp-jj.scope" in start["MESSAGE"]
    assert SUMMARY.match(summary["MESSAGE"])
    assert {k: summary[k] for k in ("PRIORITY", "FFRTMP_VERDICT", "FFRTMP_REASON", "FFRTMP_EXIT_CODE")} == {
        "PRIORITY": "6",
        "FFRTMP_VERDICT": "compliant",
        "FFRTMP_REASON": "workload_failed_platform_ok",
        "FFRTMP_EXIT_CODE": "3",
    }
    assert summary["FFRTMP_GOVERNED"] == "1" and "FFRTMP_SIGNAL" not in summary


def test_an_error_before_any_scope_is_an_entry_not_tied_to_a_unit(
    sandbox: Sandbox, state_dir: Path, journal: tuple[Path, socket.socket]
) -> None:
    path, sock = journal
    r = _ffrtmp(sandbox, state_dir, path, "run", "--job-id", "e1", "--", "/nonexistent/x")
    assert r.returncode == 127
    entries = _received(sock)
    assert [e["MESSAGE"] for e in entries] == r.stderr.splitlines()
    assert entries[-1]["PRIORITY"] == "3" and entries[-1]["FFRTMP_JOB_ID"] == "e1"
    assert "No such file" in entries[-1]["MESSAGE"]


HOW = ("agent", "in-process")  # who governs, as the start line says


@pytest.mark.parametrize("where", ["none", "full"])
def test_without_a_journal_or_with_a_full_one_nothing_changes(
    sandbox: Sandbox, state_dir: Path, journal: tuple[Path, socket.socket], tmp_path: Path, where: str
) -> None:
    path, _ = journal
    if where == "none":
        path = tmp_path / "no-such.socket"
    else:  # a journald that reads nothing: its queue is full, a blocking send would wait forever
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        with pytest.raises(BlockingIOError):
            while True:
                filler.sendto(b"MESSAGE=x\n", str(path))
        filler.close()
    r = _ffrtmp(
        sandbox, state_dir, path, "run", "--job-id", "n1", "--", "sh", "-c", "echo out; echo err >&2; exit 5"
    )
    assert (r.returncode, r.stdout) == (5, "out\n")
    lines = r.stderr.splitlines()  # the workload's own line may come before or after the start line
    assert len(lines) == 3 and lines.count("err") == 1
    ours = [line for line in lines if line != "err"]
    pid = ours[1].split("pid=")[1].split()[0]
    assert ours[0] in (f"ffrtmp: job n1 started in ffrtmp-n1.scope (pid {pid}, {how})" for how in HOW)
    assert SUMMARY.match(ours[1]) and "reason=workload_failed_platform_ok | runtime=" in ours[1]


def test_lines_of_no_job_are_not_sent(
    sandbox: Sandbox, state_dir: Path, journal: tuple[Path, socket.socket]
) -> None:
    path, sock = journal
    bad = _ffrtmp(sandbox, state_dir, path, "run", "--cpu-quota", "x", "--", "true")
    shown = _ffrtmp(sandbox, state_dir, path, "show", "nothing")
    assert (bad.returncode, shown.returncode) == (125, 1) and bad.stderr and shown.stderr
    assert _received(sock) == []
