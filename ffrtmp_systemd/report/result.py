"""The frozen job record and its verdict ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from .. import __version__


class Mode(StrEnum):
    RUN = "run"
    ATTACH = "attach"


class Reason(StrEnum):
    COMPLETED_WITHIN_LIMITS = "completed_within_limits"
    WORKLOAD_FAILED_PLATFORM_OK = "workload_failed_platform_ok"
    DETACHED_WORKLOAD_CONTINUES = "detached_workload_continues"
    GOVERNANCE_UNAVAILABLE = "governance_unavailable"
    OOM_KILLED = "oom_killed"
    GOVERNANCE_LOST = "governance_lost"
    OBSERVER_LOST = "observer_lost"

    @property
    def compliant(self) -> bool:
        return self in (
            Reason.COMPLETED_WITHIN_LIMITS,
            Reason.WORKLOAD_FAILED_PLATFORM_OK,
            Reason.DETACHED_WORKLOAD_CONTINUES,
        )


@dataclass(frozen=True)
class Contract:
    job_id: str
    mode: Mode
    pid: int
    unit: str
    limits: dict[str, Any]
    intent: str | None
    wrapper_pid: int
    start_time: str
    command: list[str] | None = None
    origin_unit: str | None = None
    limits_released_at: str | None = None
    governed: bool = False  # set once the scope exists


@dataclass(frozen=True)
class Outcome:
    end_time: datetime
    exit_code: int | None = None
    signal: int | None = None
    oom_killed: bool = False
    governance_lost: bool = False
    detached: bool = False
    start_time: datetime | None = None  # None: the contract's
    attach_time: datetime | None = None
    seconds: float | None = None  # monotonic (systemd's stamps); None: end - start


@dataclass(frozen=True)
class Result:
    job_id: str
    mode: Mode
    pid: int
    unit: str
    intent: str | None
    limits: dict[str, Any]
    command: list[str] | None
    governed: bool
    governance_error: str | None
    origin_unit: str | None
    start_time: str
    attach_time: str | None
    end_time: str
    processing_seconds: float
    exit_code: int | None
    signal: int | None
    oom_killed: bool
    limits_released_at: str | None
    platform_sla_compliant: bool
    platform_sla_reason: Reason
    wrapper_version: str


def _utc(t: datetime) -> datetime:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def rfc3339(t: datetime) -> str:
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(s: str) -> datetime:
    return _utc(datetime.fromisoformat(s))


def verdict(governed: bool, o: Outcome) -> Reason:
    if not governed:
        return Reason.GOVERNANCE_UNAVAILABLE
    if o.oom_killed:
        return Reason.OOM_KILLED
    if o.governance_lost:
        return Reason.GOVERNANCE_LOST
    if o.detached:
        return Reason.DETACHED_WORKLOAD_CONTINUES
    if o.exit_code not in (0, None) or o.signal:
        return Reason.WORKLOAD_FAILED_PLATFORM_OK
    return Reason.COMPLETED_WITHIN_LIMITS


def freeze(
    c: Contract, o: Outcome, governed: bool, governance_error: str | None, reason: Reason | None = None
) -> Result:
    why = verdict(governed, o) if reason is None else reason
    start, end = _utc(o.start_time or parse_rfc3339(c.start_time)), _utc(o.end_time)
    kw = asdict(c)  # deep copies: the record shares nothing with the contract
    del kw["wrapper_pid"]
    kw.update(start_time=rfc3339(start), end_time=rfc3339(end), exit_code=o.exit_code, signal=o.signal)
    kw.update(oom_killed=o.oom_killed, governed=governed, governance_error=governance_error)
    kw.update(attach_time=rfc3339(o.attach_time) if o.attach_time else None, wrapper_version=__version__)
    secs = max(0.0, round((end - start).total_seconds() if o.seconds is None else o.seconds, 6))
    return Result(
        **kw, processing_seconds=secs, platform_sla_reason=why, platform_sla_compliant=why.compliant
    )


def to_json(r: Result | Contract) -> str:
    return json.dumps(asdict(r), sort_keys=True, indent=2) + "\n"


T = TypeVar("T", Result, Contract)


def _load(cls: type[T], text: str) -> T:
    try:
        d = json.loads(text)
        d["mode"] = Mode(d["mode"])
        if cls is Result:
            d["platform_sla_reason"] = Reason(d["platform_sla_reason"])
        return cls(**d)
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a {cls.__name__} record: {e}") from e


def result_from_json(text: str) -> Result:
    return _load(Result, text)


def contract_from_json(text: str) -> Contract:
    return _load(Contract, text)


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


def summary_line(r: Result) -> str:
    sla = "COMPLIANT" if r.platform_sla_compliant else "VIOLATION"
    ex = "-" if r.exit_code is None else r.exit_code
    intent = printable(r.intent or "-").replace("|", "\\x7c")
    return (
        f"JOB {printable(r.job_id)} | mode={r.mode} | intent={intent} | sla={sla}"
        f" | reason={r.platform_sla_reason} | runtime={r.processing_seconds:.3f}s | exit={ex}"
        f" | pid={r.pid} | unit={printable(r.unit)}"
    )
