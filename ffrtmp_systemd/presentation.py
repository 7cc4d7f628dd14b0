"""What people read: the summary line, `show`, the `ls` table (and `ls --json`). Formatting ONLY.

Limits as an operator writes them (`cpu 50%`, `memory 64M`, `io-max /dev/vda rbps=1M`), sizes and
times in human form, commands shell-quoted, control characters escaped; never a Python repr.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import shlex
import signal
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

from .limits import INFINITY
from .names import printable
from .report.result import Result, parse_rfc3339

if TYPE_CHECKING:
    from .listing import Running

_UNITS = ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K"))
_NAMES = {"cpu_weight": "cpu-weight", "memory_max": "memory", "io_weight": "io-weight"}


def plain(value: object) -> str:
    """Any record value for people: '-' for nothing, yes/no, a command shell-quoted, JSON for the rest."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return printable(shlex.join(value))
    if isinstance(value, int | float | str):
        return printable(str(value))
    return printable(json.dumps(value, sort_keys=True))


def exact_size(n: int) -> str:
    """A size limit as written: the largest K/M/G/T suffix that divides it exactly, or `max`."""
    if n == INFINITY:
        return "max"
    return next((f"{n // m}{s}" for m, s in _UNITS if n % m == 0), str(n))


def size(n: int | None) -> str:
    """A measured size, rounded: 8.2M."""
    if n is None:
        return "-"
    m, s = next(((m, s) for m, s in _UNITS if n >= m), (1, "B"))
    return f"{n}B" if m == 1 else f"{n / m:.1f}{s}"


def duration(seconds: float | None) -> str:
    """1.5s, 4m05s, 2h03m10s, 3d04h05m."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s"


def when(rfc3339: str | None) -> str:
    """2026-11-30 12:00:00 UTC (a value that is not a time is shown as it is)."""
    try:
        return parse_rfc3339(rfc3339).strftime("%Y-%m-%d %H:%M:%S UTC") if rfc3339 else "-"
    except (TypeError, ValueError):
        return plain(rfc3339)


def _count(n: object, as_size: bool) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return plain(n)
    return exact_size(n) if as_size else "max" if n == INFINITY else str(n)


def _cpu(per_sec: object, period: object) -> str:
    if not isinstance(per_sec, int) or isinstance(per_sec, bool):
        return f"cpu {plain(per_sec)}" + ("" if period is None else f" period {plain(period)}")
    if isinstance(period, int) and not isinstance(period, bool):  # --cpu-max "QUOTA PERIOD"
        quota = "max" if per_sec == INFINITY else str(per_sec * period // 10**6)  # systemd: floor
        return f"cpu-max {quota} {period}"
    if per_sec == INFINITY:
        return "cpu max"
    whole, frac = divmod(per_sec, 10000)
    return f"cpu {whole}{f'.{frac:04d}'.rstrip('0') if frac else ''}%"


def _io(rule: object) -> str:
    if not isinstance(rule, dict):
        return f"io-max {plain(rule)}"
    keys = ("rbps", "wbps", "riops", "wiops")
    pairs = [f"{k}={_count(rule[k], k.endswith('bps'))}" for k in keys if k in rule]
    rest = {k: v for k, v in rule.items() if k not in (*keys, "device")}
    return " ".join(["io-max", plain(rule.get("device")), *pairs] + ([plain(rest)] if rest else []))


def limits_text(limits: dict[str, Any] | None) -> str:
    """`cpu 50%, memory 64M, io-max /dev/vda rbps=1M`; `none` when nothing was asked."""
    if not limits:
        return "none"
    d = dict(limits)
    out = []
    if "cpu_quota_per_sec_usec" in d or "cpu_period_usec" in d:
        out.append(_cpu(d.pop("cpu_quota_per_sec_usec", None), d.pop("cpu_period_usec", None)))
    io = d.pop("io_max", [])
    for key, value in d.items():
        name = _NAMES.get(key, key.replace("_", "-"))
        out.append(f"{printable(name)} {_count(value, key == 'memory_max')}")
    out += [_io(rule) for rule in (io if isinstance(io, list) else [io])]
    return ", ".join(out)


def _exit(r: Result) -> str:
    if r.signal:
        return _signame(r.signal)
    return "-" if r.exit_code is None else str(r.exit_code)


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def summary_line(r: Result) -> str:
    """One line per job; no field can forge another (control characters and '|' escaped)."""
    sla = "COMPLIANT" if r.platform_sla_compliant else "VIOLATION"
    ex = "-" if r.exit_code is None else r.exit_code
    intent = printable(r.intent or "-").replace("|", "\\x7c")
    return (
        f"JOB {printable(r.job_id)} | mode={r.mode} | intent={intent} | sla={sla}"
        f" | reason={r.platform_sla_reason} | runtime={r.processing_seconds:.3f}s | exit={ex}"
        f" | pid={r.pid} | unit={printable(r.unit)}"
    )


def result_text(r: Result) -> str:
    """`show`: the summary line, then each field of the record, in the record's order."""
    shown: dict[str, str] = {
        "limits": limits_text(r.limits),
        "processing_seconds": duration(r.processing_seconds),
        "signal": "-" if r.signal is None else f"{r.signal} ({_signame(r.signal)})",
    }
    lines = [summary_line(r)]
    for f in fields(r):
        value = getattr(r, f.name)
        text = shown.get(f.name) or (when(value) if f.name.endswith(("_time", "_at")) else plain(value))
        lines.append(f"  {f.name}: {text}")
    return "\n".join(lines) + "\n"


def _origin(origin: str | None) -> str:
    """What made a job (watch:RULE), one word: a record written by hand cannot shift the columns."""
    return "-" if not origin else printable(origin).replace(" ", "\\x20")


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def table(live: list[Running], done: list[Result] | None) -> str:
    """`ls`: running jobs, then (with --all) the recent results."""
    rows = [["JOB", "MODE", "ORIGIN", "STATE", "PIDS", "MEMORY", "CPU", "AGE", "LIMITS"]]
    for j in live:
        pids = ",".join(map(str, j.pids)) or "-"
        cpu, age = duration(j.cpu_seconds), duration(j.age_seconds)
        lim = "-" if j.limits is None else limits_text(j.limits)
        row = [j.job_id, j.mode or "-", _origin(j.origin), j.state, pids, size(j.memory_bytes), cpu, age]
        rows.append([*row, lim])
    out = _columns(rows)
    if done is not None:
        rows = [["JOB", "MODE", "ORIGIN", "SLA", "REASON", "EXIT", "RUNTIME", "ENDED"]]
        for x in done:
            sla = "compliant" if x.platform_sla_compliant else "VIOLATION"
            t = duration(x.processing_seconds)
            row = [x.job_id, str(x.mode), _origin(x.origin), sla, str(x.platform_sla_reason), _exit(x), t]
            rows.append([*row, when(x.end_time)])
        out += ["", *_columns(rows)]
    return "\n".join(out) + "\n"


def listing_json(live: list[Running], done: list[Result]) -> str:
    """`ls --json`: exact values for machines."""
    doc = {"running": [asdict(j) for j in live], "results": [asdict(r) for r in done]}
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"
