"""CLI limit values -> scope properties; every scope property's D-Bus signature ONLY. Standard library only,
and none of its heavier modules (dataclasses, pathlib, typing): the thin client checks limits with it."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

import os
import re
import stat
from collections import namedtuple

from ffrtmp_systemd.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

INFINITY = 2**64 - 1
_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_IO = dict(
    rbps="IOReadBandwidthMax", wbps="IOWriteBandwidthMax", riops="IOReadIOPSMax", wiops="IOWriteIOPSMax"
)
_T = {
    "cpu_quota_per_sec_usec": "CPUQuotaPerSecUSec",
    "cpu_period_usec": "CPUQuotaPeriodUSec",
    "cpu_weight": "CPUWeight",
    "memory_max": "MemoryMax",
    "io_weight": "IOWeight",
}
_SIZE = "bytes, or with K/M/G/T suffix, or max"


class IOMax(namedtuple("IOMax", "device rbps wbps riops wiops", defaults=(None, None, None, None))):
    """One --io-max rule (frozen): the device's /dev path, its limits (None: not set)."""

    __slots__ = ()


def _set(obj: "IOMax | Limits") -> "dict[str, Any]":
    return {k: v for k, v in obj._asdict().items() if v not in (None, ())}


class Limits(
    namedtuple(
        "Limits",
        ["cpu_quota_per_sec_usec", "cpu_period_usec", "cpu_weight", "memory_max", "io_weight", "io_max"],
        defaults=(None, None, None, None, None, ()),
    )
):
    """A job's limits (frozen), in the units of their scope properties; None: not set."""

    __slots__ = ()

    def as_dict(self) -> dict[str, object]:
        d = _set(self)
        if self.io_max:
            d["io_max"] = [_set(i) for i in self.io_max]
        return d

    @classmethod
    def from_dict(cls, d: "dict[str, Any]") -> "Limits":
        return cls(**{**d, "io_max": tuple(IOMax(**i) for i in d.get("io_max", ()))})


def _bad(option: str, what: str, text: object, hint: str = "") -> UsageError:
    return UsageError(f"{option}: {what} {text!r}" + (f" ({hint})" if hint else ""))


def _num(text: str, suffix: bool = False) -> int | None:
    """Positive int < INFINITY (<= 20 digits: int() limit), "max" -> INFINITY, else None."""
    if text == "max":
        return INFINITY
    m = re.fullmatch(r"([0-9]{1,20})([KMGTkmgt]?)" if suffix else "([0-9]{1,20})()", text)
    n = int(m[1]) * _MULT[m[2].upper()] if m else 0
    return n if 0 < n < INFINITY else None


def parse_size(text: str, option: str) -> int:
    n = _num(text, True)
    if n is None:
        raise _bad(option, "invalid size", text, _SIZE)
    return n


def parse_cpu_max(text: str) -> tuple[int, int]:
    f = text.split()
    q, p = (*f, "100000")[:2] if 1 <= len(f) <= 2 else ("", "")
    quota = _num(q)
    period = int(p) if re.fullmatch("[0-9]{1,7}", p) else 0
    # rounded up: systemd rounds CPUQuotaPerSecUSec * PERIOD / 1 s down, which then gives back QUOTA exactly
    per_sec = INFINITY if quota == INFINITY else -(-(quota or 0) * 10**6 // max(period, 1))
    if not (0 < per_sec <= INFINITY and 1000 <= period <= 10**6):
        raise _bad("--cpu-max", "invalid value", text, "QUOTA|max [PERIOD], in µs, PERIOD 1000..1000000")
    return per_sec, period


def parse_cpu_quota(text: str) -> int:
    m = re.fullmatch(r"([0-9]{1,20})(?:\.([0-9]{1,20}))?", text)
    n = 0
    if m:  # exactly, rounded half to even (no fractions module: it costs the thin client 4 ms to import)
        digits = m[2] or ""
        n, r = divmod(int(m[1] + digits) * 10000, 10 ** len(digits))
        n += 2 * r > 10 ** len(digits) or (2 * r == 10 ** len(digits) and n % 2 == 1)
    if not 0 < n < INFINITY:
        raise _bad("--cpu-quota", "invalid percentage", text, "of one core, > 0, e.g. 50 or 12.5")
    return n


def parse_weight(value: int | str, option: str) -> int:
    n = int(value) if isinstance(value, str) and re.fullmatch("[0-9]{1,5}", value) else value
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10000:
        raise _bad(option, "invalid weight", value, "1..10000")
    return n


def parse_io_max(text: str) -> IOMax:
    dev, *pairs = text.split() or [""]
    kv: dict[str, int] = {}
    for pair in pairs:
        k, eq, v = pair.partition("=")
        if k not in _IO or not eq:
            raise _bad("--io-max", "unknown key", pair, "rbps=, wbps=, riops=, wiops=")
        if k in kv:
            raise _bad("--io-max", "duplicate key", k)
        n = _num(v, k.endswith("bps"))
        if n is None:
            raise _bad("--io-max", f"invalid {k}", v, _SIZE if k.endswith("bps") else "positive int, or max")
        kv[k] = n
    if not kv:
        raise _bad("--io-max", "no limit in", text, "DEVICE KEY=VALUE...")
    path = dev
    try:
        if re.fullmatch("[0-9]{1,10}:[0-9]{1,10}", dev):  # the kernel names the node; no udev needed
            with open(f"/sys/dev/block/{dev}/uevent") as f:
                uevent = f.read()
            path = "/dev/" + next(ln[8:] for ln in uevent.splitlines() if ln.startswith("DEVNAME="))
        ok = path.startswith("/dev/") and stat.S_ISBLK(os.stat(path).st_mode)
    except (OSError, ValueError, StopIteration):
        ok = False
    if not ok:
        raise _bad("--io-max", "no block device", dev)
    return IOMax(path, **kv)


def parse_limits(
    cpu_max: str | None = None,
    cpu_quota: str | None = None,
    cpu_weight: int | str | None = None,
    memory_max: str | None = None,
    io_weight: int | str | None = None,
    io_max: "Sequence[str]" = (),
) -> Limits:
    if cpu_max is not None and cpu_quota is not None:
        raise UsageError("--cpu-max and --cpu-quota are exclusive")
    quota = None if cpu_quota is None else parse_cpu_quota(cpu_quota)
    period = None
    if cpu_max is not None:
        quota, period = parse_cpu_max(cpu_max)
    cw = None if cpu_weight is None else parse_weight(cpu_weight, "--cpu-weight")
    mem = None if memory_max is None else parse_size(memory_max, "--memory-max")
    iow = None if io_weight is None else parse_weight(io_weight, "--io-weight")
    return Limits(quota, period, cw, mem, iow, tuple(parse_io_max(t) for t in io_max))


def to_properties(limits: Limits) -> list[tuple[str, str, object]]:
    props: list[tuple[str, str, object]] = [(_T[k], "t", v) for k, v in limits.as_dict().items() if k in _T]
    for key, name in _IO.items():
        if rows := [[i.device, v] for i in limits.io_max if (v := getattr(i, key)) is not None]:
            props.append((name, "a(st)", rows))
    return props


def scope_properties(
    pids: list[int], slice_: str, description: str, limits: Limits, oom_continue: bool
) -> list[tuple[str, str, object]]:
    """Every property of a job's new scope, with its D-Bus signature: its PIDs, its slice, held until
    it is gone (AddRef), collected even if failed, its limits; OOMPolicy=continue where the manager
    knows it (`oom_continue`): the kernel's OOM victim is then the only process that dies."""
    return [
        ("PIDs", "au", pids),
        ("Slice", "s", slice_),
        ("AddRef", "b", True),
        ("CollectMode", "s", "inactive-or-failed"),
        ("Description", "s", description[:500]),
        *to_properties(limits),
        *([("OOMPolicy", "s", "continue")] if oom_continue else []),
    ]


def release_properties() -> list[tuple[str, str, object]]:
    """Lift every limit (the undo). 2**64-1 means "unset" for weights too."""
    lift = ("CPUQuotaPerSecUSec", "MemoryMax", "CPUWeight", "IOWeight")
    return [(n, "t", INFINITY) for n in lift] + [(n, "a(st)", []) for n in _IO.values()]
