"""What people read: limits as written, sizes and times in human form, the summary line, `show`."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from dataclasses import fields
from datetime import timedelta

import pytest
from helpers import T0, contract, golden_result
from hypothesis import given
from hypothesis import strategies as st

from ffrtmp_systemd.limits import INFINITY, Limits, parse_cpu_max, parse_limits
from ffrtmp_systemd.presentation import duration, limits_text, result_text, size, summary_line, when
from ffrtmp_systemd.report.result import Mode, Outcome, Result, freeze

REPRS = ("{'", "['", "None", "True", "False", "(", "<")


@pytest.mark.parametrize(
    ("limits", "text"),
    [
        (Limits(), "none"),
        (parse_limits(cpu_quota="50", memory_max="64M"), "cpu 50%, memory 64M"),
        (parse_limits(cpu_quota="12.5", cpu_weight="200", io_weight="300"),
         "cpu 12.5%, cpu-weight 200, io-weight 300"),
        (parse_limits(cpu_quota="250.0001"), "cpu 250.0001%"),
        (parse_limits(cpu_max="50000 100000"), "cpu-max 50000 100000"),
        (parse_limits(cpu_max="1 3000"), "cpu-max 1 3000"),  # per second: 333 µs, rounded down
        (parse_limits(cpu_max="max 50000", memory_max="max"), "cpu-max max 50000, memory max"),
        (parse_limits(memory_max="1536K"), "memory 1536K"),
        (parse_limits(memory_max="1000"), "memory 1000"),
        (Limits(io_max=()), "none"),
    ],
)  # fmt: skip
def test_limits_as_an_operator_writes_them(limits: Limits, text: str) -> None:
    assert limits_text(limits.as_dict()) == text


def test_io_max_and_odd_records_never_show_a_repr() -> None:
    d = {"io_max": [{"device": "/dev/vda", "rbps": 1 << 20, "wiops": INFINITY, "riops": 100}]}
    assert limits_text(d) == "io-max /dev/vda rbps=1M riops=100 wiops=max"
    odd = {"cpu_quota": "200%", "memory_max": None, "x": {"a": [1]}, "io_max": "sda"}  # hand-edited records
    text = limits_text(odd)
    assert text == 'cpu-quota 200%, memory -, x {"a": [1]}, io-max sda'
    assert not any(r in text for r in REPRS)


@pytest.mark.parametrize("quota", [1, 999, 1000, 33333, 50000, 123457, 1000000])
@pytest.mark.parametrize("period", [1000, 3000, 33333, 100000, 1000000])
def test_cpu_max_shows_the_quota_that_was_written(quota: int, period: int) -> None:
    per_sec, _ = parse_cpu_max(f"{quota} {period}")
    assert limits_text({"cpu_quota_per_sec_usec": per_sec, "cpu_period_usec": period}) == (
        f"cpu-max {quota} {period}"
    )


def test_human_sizes_durations_times() -> None:
    assert [size(n) for n in (None, 0, 1023, 1024, 8 << 20 | 200 << 10, 3 << 40)] == [
        "-", "0B", "1023B", "1.0K", "8.2M", "3.0T",
    ]  # fmt: skip
    assert [duration(s) for s in (None, 0.04, 59.94, 60, 245.9, 7390, 3 * 86400 + 4 * 3600 + 300)] == [
        "-", "0.0s", "59.9s", "1m00s", "4m05s", "2h03m10s", "3d04h05m",
    ]  # fmt: skip
    assert when("2026-11-30T12:00:00.123456Z") == "2026-11-30 12:00:00 UTC"
    assert when(None) == "-" and when("yesterday") == "yesterday"


def test_summary_lines() -> None:
    r = golden_result()
    assert summary_line(r) == (
        "JOB job-1 | mode=run | intent=transcode | sla=COMPLIANT | reason=completed_within_limits"
        " | runtime=90.123s | exit=0 | pid=4242 | unit=ffrtmp-job-1.scope"
    )
    c = contract(mode=Mode.ATTACH, intent="a\nJOB forged")
    r = freeze(c, Outcome(T0 + timedelta(seconds=2), signal=9, oom_killed=True), True, None)
    assert summary_line(r) == (
        "JOB job-1 | mode=attach | intent=a\\nJOB forged | sla=VIOLATION | reason=oom_killed"
        " | runtime=2.000s | exit=- | pid=4242 | unit=ffrtmp-job-1.scope"
    )


def test_show_lists_every_field_for_people() -> None:
    c = contract(
        command=["sh", "-c", "echo 'a b' \"$X\"\n"], intent=None, limits=parse_limits("1 3000").as_dict()
    )
    r = freeze(c, Outcome(T0 + timedelta(seconds=5), signal=9), True, None)
    lines = result_text(r).splitlines()
    assert lines[0] == summary_line(r)
    fields = dict(ln.strip().split(": ", 1) for ln in lines[1:])
    assert list(fields)[:3] == ["job_id", "mode", "pid"]  # the record's order
    assert fields["command"] == "sh -c 'echo '\"'\"'a b'\"'\"' \"$X\"\\n'"
    assert fields["limits"] == "cpu-max 1 3000" and fields["intent"] == "-"
    assert fields["signal"] == "9 (SIGKILL)" and fields["governed"] == "yes" and fields["oom_killed"] == "no"
    assert fields["end_time"] == "2026-11-30 12:00:05 UTC" and fields["processing_seconds"] == "5.0s"
    assert not any(r in v for v in fields.values() for r in REPRS if r != "(")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.text(), JSON, max_size=4), st.lists(st.text(), max_size=4), st.text())
def test_any_record_is_one_line_per_field_without_a_python_repr(
    limits: dict[str, object], command: list[str], intent: str
) -> None:
    """Whatever a (hand-edited, hostile) record holds: no repr, no forged line."""
    r = freeze(contract(limits=limits, command=command, intent=intent), Outcome(T0), True, "bus\nlost")
    lines = result_text(r).splitlines()[1:]
    assert [ln.partition(": ")[0].strip() for ln in lines] == [f.name for f in fields(Result)]
    for f, line in zip(fields(Result), lines, strict=True):
        shown = line.partition(": ")[2]
        if not isinstance(getattr(r, f.name), str):  # a str may say anything, even "None"
            assert shown not in ("None", "True", "False") and not shown.startswith(("{'", "['")), line
