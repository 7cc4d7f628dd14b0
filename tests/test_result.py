"""Tests of the frozen job record: verdicts, freeze arithmetic, summary line, pinned JSON schema."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from helpers import T0, contract, golden_result

from ffrtmp_systemd import __version__
from ffrtmp_systemd.report.result import (
    Contract,
    Mode,
    Outcome,
    Reason,
    Result,
    freeze,
    from_json,
    parse_rfc3339,
    rfc3339,
    to_json,
    verdict,
)

GOLDEN = Path(__file__).parent / "golden" / "result.json"


@pytest.mark.parametrize(
    ("governed", "outcome", "reason"),
    [
        (False, Outcome(T0, exit_code=0), Reason.GOVERNANCE_UNAVAILABLE),
        (False, Outcome(T0, oom_killed=True, governance_lost=True), Reason.GOVERNANCE_UNAVAILABLE),
        (True, Outcome(T0, oom_killed=True, governance_lost=True, detached=True), Reason.OOM_KILLED),
        (True, Outcome(T0, governance_lost=True, detached=True, exit_code=1), Reason.GOVERNANCE_LOST),
        (True, Outcome(T0, detached=True, exit_code=3), Reason.DETACHED_WORKLOAD_CONTINUES),
        (True, Outcome(T0, exit_code=1), Reason.WORKLOAD_FAILED_PLATFORM_OK),
        (True, Outcome(T0, signal=9), Reason.WORKLOAD_FAILED_PLATFORM_OK),
        (True, Outcome(T0, exit_code=0), Reason.COMPLETED_WITHIN_LIMITS),
        (True, Outcome(T0), Reason.COMPLETED_WITHIN_LIMITS),
    ],
)
def test_verdict_table(governed: bool, outcome: Outcome, reason: Reason) -> None:
    assert verdict(governed, outcome) is reason


def test_compliance_of_every_reason() -> None:
    ok = {
        Reason.COMPLETED_WITHIN_LIMITS,
        Reason.WORKLOAD_FAILED_PLATFORM_OK,
        Reason.DETACHED_WORKLOAD_CONTINUES,
    }
    assert {r for r in Reason if r.compliant} == ok


def test_the_readme_documents_every_reason_and_its_verdict() -> None:
    """A reason added, renamed or moved between the two sides without the README saying so fails here."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    text = readme[readme.index("Verdict reasons") :].split("\n\n")[0]
    compliant, violations = text.split("Violations:")
    assert re.findall(r"`([a-z_]+)`", compliant) == [r.value for r in Reason if r.compliant]
    assert re.findall(r"`([a-z_]+)`", violations) == [r.value for r in Reason if not r.compliant]


def test_freeze_uses_contract_start_and_rounds() -> None:
    r = freeze(contract(), Outcome(T0 + timedelta(seconds=1.2345678), exit_code=0), True, None)
    assert r.processing_seconds == 1.234568
    assert (r.start_time, r.end_time) == ("2026-11-30T12:00:00.000000Z", "2026-11-30T12:00:01.234568Z")
    assert (r.platform_sla_reason, r.platform_sla_compliant) == (Reason.COMPLETED_WITHIN_LIMITS, True)
    assert r.wrapper_version == __version__


def test_freeze_prefers_observed_start_and_never_goes_negative() -> None:
    o = Outcome(T0 + timedelta(seconds=5), start_time=T0 + timedelta(seconds=2), attach_time=T0)
    r = freeze(contract(mode=Mode.ATTACH, command=None), o, True, None)
    assert (r.processing_seconds, r.start_time) == (3.0, "2026-11-30T12:00:02.000000Z")
    assert r.attach_time == "2026-11-30T12:00:00.000000Z"
    assert freeze(contract(), Outcome(T0 - timedelta(seconds=5)), True, None).processing_seconds == 0.0


def test_freeze_reason_override_and_ungoverned() -> None:
    r = freeze(contract(), Outcome(T0, exit_code=0), True, None, reason=Reason.OBSERVER_LOST)
    assert (r.platform_sla_reason, r.platform_sla_compliant) == (Reason.OBSERVER_LOST, False)
    r = freeze(contract(), Outcome(T0, exit_code=0), False, "no bus")
    assert (r.governed, r.governance_error, r.platform_sla_reason) == (
        False,
        "no bus",
        "governance_unavailable",
    )


def test_freeze_copies_mutable_fields() -> None:
    c = contract()
    r = freeze(c, Outcome(T0), True, None)
    c.limits["cpu_quota"] = "1%"
    assert r.limits["cpu_quota"] == "200%"


def test_rfc3339() -> None:
    t = datetime(2026, 11, 30, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert rfc3339(t) == "2026-11-30T12:00:00.123456Z"
    assert parse_rfc3339("2026-11-30T12:00:00.123456Z") == t
    assert parse_rfc3339(rfc3339(T0)).tzinfo is UTC


def test_golden_schema() -> None:
    assert to_json(golden_result()) == GOLDEN.read_text(encoding="utf-8")


def test_json_round_trip() -> None:
    r = golden_result()
    back = from_json(Result, to_json(r))
    assert back == r and isinstance(back.mode, Mode) and isinstance(back.platform_sla_reason, Reason)
    c = contract(origin_unit="session-3.scope", origin="watch:rtmp")
    assert from_json(Contract, to_json(c)) == c
    o = Outcome(end_time=T0, exit_code=7)
    assert from_json(Result, to_json(freeze(c, o, True, None))).origin == "watch:rtmp"


def test_records_older_than_origin_still_read() -> None:
    d = json.loads(to_json(golden_result()))
    del d["origin"]
    assert from_json(Result, json.dumps(d)).origin is None
    d = json.loads(to_json(contract()))
    del d["origin"]
    assert from_json(Contract, json.dumps(d)).origin is None
    with pytest.raises(ValueError, match="origin"):
        from_json(Result, to_json(golden_result()).replace('"origin": null', '"origin": 7'))


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"mode": "run"}', '{"mode": "nope"}'])
def test_bad_json_is_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        from_json(Contract, text)
    with pytest.raises(ValueError):
        from_json(Result, text)


def test_extra_field_is_rejected() -> None:
    text = to_json(golden_result()).replace('"unit"', '"extra": 1, "unit"')
    with pytest.raises(ValueError):
        from_json(Result, text)


def test_processing_seconds_are_the_monotonic_span_when_known() -> None:
    """A wall-clock step (NTP on a box without RTC) between start and end does not change the duration."""
    stepped = Outcome(T0 + timedelta(hours=1), exit_code=0, seconds=2.5)
    assert freeze(contract(), stepped, True, None).processing_seconds == 2.5
    back = Outcome(T0 - timedelta(hours=1), exit_code=0, seconds=0.25)
    assert freeze(contract(), back, True, None).processing_seconds == 0.25
