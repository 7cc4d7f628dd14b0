"""The frozen job record and its verdict ONLY."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import UnionType
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from .. import __version__
from ..names import unit_name
from ..proc import identity


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
    wrapper_id: str | None = None  # the wrapper's boot id and start time (proc.identity); None: older
    origin: str | None = None  # what made the job: "watch:RULE"; None: run, attach (or older)


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
    origin: str | None = None  # as the contract's (older records have none)


def _utc(t: datetime) -> datetime:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def rfc3339(t: datetime) -> str:
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(s: str) -> datetime:
    return _utc(datetime.fromisoformat(s))


def contract(
    job: str, mode: str, pid: int, limits: dict[str, Any], intent: str | None, t: datetime, **kw: Any
) -> Contract:
    """A new job's contract; its wrapper (`wrapper`, default this process) is the one that asks for the
    freeze: a client of the agent, or this process."""
    me = kw.pop("wrapper", None) or os.getpid()
    return Contract(
        job, Mode(mode), pid, unit_name(job), limits, intent, me, rfc3339(t), **kw, wrapper_id=identity(me)
    )


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
    del kw["wrapper_pid"], kw["wrapper_id"]
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


PID_MAX_LIMIT = 1 << 22
TIMES = ("start_time", "end_time", "attach_time", "limits_released_at")


def _spec(t: Any) -> tuple[tuple[type, ...], type]:
    """What an annotation allows, as JSON gives it: (types, type of list items); a float may be an int."""
    opts = get_args(t) if isinstance(t, UnionType) else (t,)
    bases = [object if o is Any else get_origin(o) or o for o in opts]
    item = next((get_args(o)[0] for o in opts if get_origin(o) is list), object)
    return (*bases, *([int] if float in bases else [])), item


def _fits(v: object, spec: tuple[tuple[type, ...], type]) -> bool:
    types, item = spec
    if isinstance(v, bool) and bool not in types and object not in types:
        return False
    return isinstance(v, types) and (not isinstance(v, list) or all(isinstance(x, item) for x in v))


SPECS = {cls: {n: (_spec(t), t) for n, t in get_type_hints(cls).items()} for cls in (Result, Contract)}


def from_json(cls: type[T], text: str) -> T:
    """A record read back, every field of its type: a bad one is a ValueError naming the field."""
    try:
        d = json.loads(text)
        d["mode"] = Mode(d["mode"])
        if cls is Result:
            d["platform_sla_reason"] = Reason(d["platform_sla_reason"])
        x = cls(**d)
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a {cls.__name__} record: {e}") from e
    for name, (spec, t) in SPECS[cls].items():
        v = getattr(x, name)
        if not _fits(v, spec) or (name in ("pid", "wrapper_pid") and not 0 < v <= PID_MAX_LIMIT):
            raise ValueError(f"{name}: {v!r} is not a valid {getattr(t, '__name__', t)}")
        if name in TIMES and v is not None:
            try:
                parse_rfc3339(v)
            except ValueError:
                raise ValueError(f"{name}: {v!r} is not an RFC 3339 time") from None
    return x
