"""limits.py: CLI limit values parse to exact numbers, bad ones to one-line UsageErrors, and to properties."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import BLOCK, need_block
from hypothesis import given
from hypothesis import strategies as st

from ffrtmp_systemd import limits as L
from ffrtmp_systemd.errors import USAGE, UsageError
from ffrtmp_systemd.limits import INFINITY, IOMax, Limits

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


# --- valid inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("1", 1),
        ("512K", 512 * K),
        ("512k", 512 * K),
        ("100M", 100 * M),
        ("2G", 2 * G),
        ("2g", 2 * G),
        ("1T", T),
        ("max", INFINITY),
        ("16777215T", 16777215 * T),
        (str(INFINITY - 1), INFINITY - 1),
    ],
)
def test_parse_size_valid(text: str, expected: int) -> None:
    assert L.parse_size(text, "--memory-max") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200000 100000", (2000000, 100000)),
        ("50000 100000", (500000, 100000)),
        ("50000", (500000, 100000)),
        ("max", (INFINITY, 100000)),
        ("max 20000", (INFINITY, 20000)),
        ("  25000   50000 ", (500000, 50000)),
        ("1 1000000", (1, 1000000)),
        ("1 1000", (1000, 1000)),
        ("3 7000", (429, 7000)),
        ("50000 30000", (1666667, 30000)),
    ],
)
def test_parse_cpu_max_valid(text: str, expected: tuple[int, int]) -> None:
    assert L.parse_cpu_max(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("50", 500000), ("150", 1500000), ("12.5", 125000), ("100", 1000000), ("0.0001", 1), ("0.00005", 0)],
)
def test_parse_cpu_quota_valid(text: str, expected: int) -> None:
    if expected == 0:  # rounds to 0 µs: refused, not a silent "no limit"
        with pytest.raises(UsageError):
            L.parse_cpu_quota(text)
    else:
        assert L.parse_cpu_quota(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"), [(1, 1), ("1", 1), (100, 100), ("10000", 10000), (10000, 10000)]
)
def test_parse_weight_valid(value: int | str, expected: int) -> None:
    assert L.parse_weight(value, "--cpu-weight") == expected


@need_block
@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("rbps=1M", {"rbps": M}),
        ("wbps=2G riops=100", {"wbps": 2 * G, "riops": 100}),
        ("wiops=max rbps=max", {"wiops": INFINITY, "rbps": INFINITY}),
        ("riops=5 wiops=6 rbps=7 wbps=8k", {"riops": 5, "wiops": 6, "rbps": 7, "wbps": 8 * K}),
    ],
)
def test_parse_io_max_valid(keys: str, expected: dict[str, int]) -> None:
    path = BLOCK[0][0]
    assert L.parse_io_max(f"{path} {keys}") == IOMax(path, **expected)


@need_block
def test_parse_io_max_maj_min_becomes_the_kernels_device_node() -> None:
    path, mm = BLOCK[0]
    assert os.stat(L.parse_io_max(f"{mm} rbps=1").device).st_rdev == os.stat(path).st_rdev


def test_parse_limits_empty_and_full() -> None:
    assert L.parse_limits() == Limits()
    assert L.parse_limits(cpu_quota="50", cpu_weight="200", memory_max="1G", io_weight=300) == Limits(
        cpu_quota_per_sec_usec=500000, cpu_weight=200, memory_max=G, io_weight=300
    )
    assert L.parse_limits(cpu_max="max 50000") == Limits(
        cpu_quota_per_sec_usec=INFINITY, cpu_period_usec=50000
    )


@need_block
def test_parse_limits_io_max() -> None:
    path = BLOCK[0][0]
    got = L.parse_limits(io_max=[f"{path} rbps=1K", f"{path} wiops=9"])
    assert got == Limits(io_max=(IOMax(path, rbps=K), IOMax(path, wiops=9)))


# --- invalid inputs ------------------------------------------------------------------------------------

Parser = Callable[..., object]
SIZES = ("12Q", "", "-1", "0", "0K", "1.5G", "1GB", "MAX", " 1G", str(INFINITY), "16777216T", "9" * 5000,
         "１２",  # fullwidth digits: int() takes them, we do not
         "1\u212a",  # KELVIN SIGN folds to k under re.I
         "1\nG")  # fmt: skip
CPU_MAX = ("", "0 100000", "-5 100000", "1000 100000 5", "1000 999", "1000 1000001", "1000 max", "lots",
           "10.5 100000")  # fmt: skip
CPU_QUOTA = ("0", "-50", "nan", "inf", "1e3", "50%", "", ".5")
IO_MAX = ("", "/dev/null rbps=1", "/dev/does-not-exist rbps=1", "/etc/passwd rbps=1", "999999:999999 rbps=1",
          "/dev/null\x00 rbps=1", "/dev/null", "/dev/null speed=1", "/dev/null rbps",
          "/dev/null rbps=1 rbps=2", "/dev/null riops=1K", "/dev/null wbps=0")  # fmt: skip
INVALID: list[tuple[Parser, tuple[Any, ...], str]] = [
    *((L.parse_size, (v, "--memory-max"), "--memory-max") for v in SIZES),
    *((L.parse_cpu_max, (v,), "--cpu-max") for v in CPU_MAX),
    *((L.parse_cpu_quota, (v,), "--cpu-quota") for v in CPU_QUOTA),
    *((L.parse_weight, (v, "--cpu-weight"), "--cpu-weight") for v in (0, 10001)),
    *((L.parse_weight, (v, "--io-weight"), "--io-weight") for v in ("-1", "abc", True, "")),
    *((L.parse_io_max, (v,), "--io-max") for v in IO_MAX),
    (L.parse_limits, (), "--cpu-max and --cpu-quota"),
]


@pytest.mark.parametrize(("parser", "args", "option"), INVALID)
def test_invalid_inputs_raise_one_line_usage_error(
    parser: Parser, args: tuple[Any, ...], option: str
) -> None:
    kwargs = {"cpu_max": "max", "cpu_quota": "50"} if parser is L.parse_limits else {}
    with pytest.raises(UsageError) as info:
        parser(*args, **kwargs)
    msg = str(info.value)
    assert option in msg and "\n" not in msg and len(msg.splitlines()) == 1
    assert info.value.exit_code == USAGE


def test_example_message_is_exact() -> None:
    with pytest.raises(
        UsageError, match=r"^--memory-max: invalid size '12Q' \(bytes, or with K/M/G/T suffix, or max\)$"
    ):
        L.parse_size("12Q", "--memory-max")
    with pytest.raises(UsageError, match=r"^--io-max: no block device 'x'$"):
        L.parse_io_max("x rbps=1")


@need_block
def test_parse_io_max_rejects_bad_keys_on_a_real_device() -> None:
    path = BLOCK[0][0]
    for bad in ("", "rbps=1 rbps=1", "foo=1", "rbps=-1", "wiops=1.5", "wbps=1Q"):
        with pytest.raises(UsageError, match=r"^--io-max"):
            L.parse_io_max(f"{path} {bad}")


# --- properties ----------------------------------------------------------------------------------------

SIZES = ["", "K", "M", "G", "T", "k", "m", "g", "t"]


@given(st.integers(1, 2**50), st.sampled_from(SIZES))
def test_parse_size_round_trip(n: int, suffix: str) -> None:
    want = n * {"": 1, "K": K, "M": M, "G": G, "T": T}[suffix.upper()]
    if want < INFINITY:
        assert L.parse_size(f"{n}{suffix}", "--memory-max") == want
    else:
        with pytest.raises(UsageError):
            L.parse_size(f"{n}{suffix}", "--memory-max")


@given(st.integers(1, 10**7), st.integers(1000, 10**6), st.booleans())
def test_parse_cpu_max_formula(quota: int, period: int, omit_period: bool) -> None:
    if omit_period:
        period = 100000
    text = str(quota) if omit_period else f"{quota} {period}"
    per_sec, got_period = L.parse_cpu_max(text)
    assert got_period == period
    assert per_sec * period // 10**6 == quota  # systemd's conversion (rounding down) gives back QUOTA exactly


IO_VALUE = st.one_of(st.integers(1, 2**40).map(str), st.just("max"))


@need_block
@given(
    st.dictionaries(st.sampled_from(["rbps", "wbps", "riops", "wiops"]), IO_VALUE, min_size=1), st.randoms()
)
def test_parse_io_max_random_keys(keys: dict[str, str], rnd: Any) -> None:
    path = BLOCK[0][0]
    pairs = [f"{k}={v}" for k, v in keys.items()]
    rnd.shuffle(pairs)
    want = {k: INFINITY if v == "max" else int(v) for k, v in keys.items()}
    assert L.parse_io_max(" ".join([path, *pairs])) == IOMax(path, **want)


PARSERS: list[Callable[[str], object]] = [
    lambda t: L.parse_size(t, "--memory-max"),
    L.parse_cpu_max,
    L.parse_cpu_quota,
    lambda t: L.parse_weight(t, "--cpu-weight"),
    L.parse_io_max,
]


@given(st.text())
def test_arbitrary_text_only_raises_usage_error(text: str) -> None:
    for parse in PARSERS:
        try:
            parse(text)
        except UsageError as err:
            assert "\n" not in str(err) and len(str(err).splitlines()) == 1


@given(st.integers())
def test_arbitrary_int_weight(n: int) -> None:
    if 1 <= n <= 10000:
        assert L.parse_weight(n, "--io-weight") == n
    else:
        with pytest.raises(UsageError):
            L.parse_weight(n, "--io-weight")


# --- dict round trip and D-Bus properties --------------------------------------------------------------

FULL = Limits(
    cpu_quota_per_sec_usec=2000000,
    cpu_period_usec=100000,
    cpu_weight=200,
    memory_max=G,
    io_weight=50,
    io_max=(IOMax("/dev/vda", rbps=M, wiops=100), IOMax("/dev/block/8:0", rbps=INFINITY, wbps=2 * M)),
)


def test_as_dict_exact_and_round_trip() -> None:
    assert Limits().as_dict() == {}
    assert Limits.from_dict({}) == Limits()
    assert Limits(memory_max=5).as_dict() == {"memory_max": 5}
    d = FULL.as_dict()
    assert d == {
        "cpu_quota_per_sec_usec": 2000000,
        "cpu_period_usec": 100000,
        "cpu_weight": 200,
        "memory_max": G,
        "io_weight": 50,
        "io_max": [
            {"device": "/dev/vda", "rbps": M, "wiops": 100},
            {"device": "/dev/block/8:0", "rbps": INFINITY, "wbps": 2 * M},
        ],
    }
    assert Limits.from_dict(json.loads(json.dumps(d))) == FULL


@given(
    st.builds(
        Limits,
        cpu_quota_per_sec_usec=st.none() | st.integers(1, INFINITY),
        cpu_period_usec=st.none() | st.integers(1000, 10**6),
        cpu_weight=st.none() | st.integers(1, 10000),
        memory_max=st.none() | st.integers(1, INFINITY),
        io_weight=st.none() | st.integers(1, 10000),
        io_max=st.lists(
            st.builds(
                IOMax,
                st.sampled_from(["/dev/vda", "/dev/block/8:0"]),
                *[st.none() | st.integers(1, INFINITY)] * 4,
            )
        ).map(tuple),
    )
)
def test_as_dict_round_trip_property(limits: Limits) -> None:
    assert Limits.from_dict(json.loads(json.dumps(limits.as_dict()))) == limits


def test_to_properties_exact() -> None:
    assert L.to_properties(Limits()) == []
    assert L.to_properties(Limits(memory_max=G)) == [("MemoryMax", "t", G)]
    assert L.to_properties(FULL) == [
        ("CPUQuotaPerSecUSec", "t", 2000000),
        ("CPUQuotaPeriodUSec", "t", 100000),
        ("CPUWeight", "t", 200),
        ("MemoryMax", "t", G),
        ("IOWeight", "t", 50),
        ("IOReadBandwidthMax", "a(st)", [["/dev/vda", M], ["/dev/block/8:0", INFINITY]]),
        ("IOWriteBandwidthMax", "a(st)", [["/dev/block/8:0", 2 * M]]),
        ("IOWriteIOPSMax", "a(st)", [["/dev/vda", 100]]),
    ]


def test_release_properties_exact() -> None:
    assert L.release_properties() == [
        ("CPUQuotaPerSecUSec", "t", INFINITY),
        ("MemoryMax", "t", INFINITY),
        ("CPUWeight", "t", INFINITY),
        ("IOWeight", "t", INFINITY),
        ("IOReadBandwidthMax", "a(st)", []),
        ("IOWriteBandwidthMax", "a(st)", []),
        ("IOReadIOPSMax", "a(st)", []),
        ("IOWriteIOPSMax", "a(st)", []),
    ]


@pytest.mark.parametrize(("cpu_max", "quota"), [("50000 30000", "50000"), ("10000 30000", "10000"),
                                                ("7000 9000", "7000")])  # fmt: skip
def test_cpu_max_lands_exactly_in_the_cgroup(sandbox: Any, state_dir: Path, cpu_max: str, quota: str) -> None:
    """QUOTA per PERIOD as asked, to the µs: no rounding of ours before systemd's own."""
    from conftest import wait_for

    proc = sandbox.spawn(["ffrtmp", "run", "--job-id", "q", "--cpu-max", cpu_max, "--", "sleep", "300"],
                         env={"FFRTMP_STATE_DIR": str(state_dir)}, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        f = sandbox.cgroup_file("cpu", "/ffrtmp.slice/ffrtmp-q.scope", "cpu.cfs_quota_us")
        wait_for(lambda: f.exists() and f.read_text().strip() not in ("", "-1"), what="the quota")
        assert f.read_text().strip() == quota
        assert f.with_name("cpu.cfs_period_us").read_text().strip() == cpu_max.split()[1]
    finally:
        sandbox.systemctl("kill", "ffrtmp-q.scope")
        proc.wait(timeout=30)


def test_scope_properties_exact() -> None:
    """Every property of a new scope in one list: where, kept how, the limits, OOMPolicy only if known."""
    props = L.scope_properties([7, 8], "ffrtmp.slice", "x" * 600, Limits(memory_max=G), oom_continue=False)
    assert props == [
        ("PIDs", "au", [7, 8]),
        ("Slice", "s", "ffrtmp.slice"),
        ("AddRef", "b", True),
        ("CollectMode", "s", "inactive-or-failed"),
        ("Description", "s", "x" * 500),
        ("MemoryMax", "t", G),
    ]
    with_oom = L.scope_properties([7], "ffrtmp.slice", "d", Limits(), oom_continue=True)
    assert with_oom[-1] == ("OOMPolicy", "s", "continue") and len(with_oom) == 6
