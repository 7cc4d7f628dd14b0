"""Names: a job id (checked or made), its scope unit, their slice, an intent, any text shown on one line.
Each spelled here ONLY (standard library only: the thin client imports it)."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

import os
import re
import time

from .errors import UsageError

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # a watch rule's name: with "-PID-TICKS", a job id
PREFIX, SUFFIX = "ffrtmp-", ".scope"
SLICE = "ffrtmp.slice"  # where every job's scope lives (units/ffrtmp.slice)


def printable(text: str) -> str:
    """One line, safe to show: a non-UTF-8 byte (a surrogate escape) as \\xNN, the unprintable escaped."""
    return "".join(
        f"\\x{ord(c) - 0xDC00:02x}"
        if "\udc80" <= c <= "\udcff"
        else c
        if c.isprintable()
        else c.encode("unicode_escape").decode()
        for c in text
    )


def job_id(given: str | None) -> str:
    if given is None:
        return time.strftime("%Y%m%dT%H%M%S-", time.gmtime()) + os.urandom(3).hex()
    if not JOB_ID.fullmatch(given):
        raise UsageError(
            f"invalid job id {given!r}: use 1-100 of A-Z a-z 0-9 _ . : - (not starting with _ . : -)"
        )
    return given


def watch_job_id(rule: str, pid: int, start_ticks: int) -> str:
    """The job of the process (PID, start time in clock ticks since boot) that a watch rule adopts: the
    same for every exec of that process, another for every other process."""
    return job_id(f"{rule}-{pid}-{start_ticks}")


def check_intent(given: str | None) -> str | None:
    if given is not None and (printable(given) != given or "|" in given):
        raise UsageError(
            f"invalid --intent '{printable(given)}': no control characters, '|' or non-UTF-8 bytes"
        )
    return given


def unit_name(job: str) -> str:
    """The job's scope; unit_name("*") is the pattern of them all."""
    return f"{PREFIX}{job}{SUFFIX}"


def job_of(unit: str | None) -> str | None:
    """The job whose scope `unit` is; None for any other unit."""
    ok = unit and unit.startswith(PREFIX) and unit.endswith(SUFFIX)
    return unit[len(PREFIX) : -len(SUFFIX)] if ok and unit else None
