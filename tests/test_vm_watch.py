"""Process events and `ffrtmp watch` on a real Debian 12 host (the connector needs the init PID namespace):
one boot running tests/vm_scenarios/watch.sh; the tests judge what it left."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from vm import VM, Boot, Result, Script

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(2400)]
SCENARIO = Path(__file__).parent / "vm_scenarios" / "watch.sh"


@pytest.fixture(scope="module")
def boot(vm: VM) -> Boot:
    return vm.boot([Script("watch", SCENARIO.read_text())], timeout=1500)  # TCG on a busy machine: slow


def text(r: Result, name: str) -> str:
    path = r.files / name
    return path.read_text().strip() if path.exists() else ""


def test_exec_and_exit_events_carry_the_exit_code_or_the_signal(boot: Boot) -> None:
    r = boot["watch"]
    assert r.status == 0, r.stderr + text(r, "events.err")
    events = text(r, "events")
    p7, pt, ps = text(r, "pe.pids").split()
    for pid in (p7, pt, ps):  # a shell's children and a .service's main process alike
        assert re.search(rf"^Exec\(pid={pid}, ", events, re.M), pid
    assert re.search(rf"^Exit\(pid={p7}, exit_code=7, signal=None, ", events, re.M)
    assert re.search(rf"^Exit\(pid={pt}, exit_code=None, signal=15, ", events, re.M)
    assert re.search(rf"^Exit\(pid={ps}, exit_code=7, signal=None, ", events, re.M)


def test_watch_adopts_exactly_what_its_rules_match(boot: Boot) -> None:
    r = boot["watch"]
    said = text(r, "watch.err")
    assert (text(r, "check.rc"), text(r, "check.out")) == ("0", "/root/watch.toml: 6 rules, valid")
    before, shell, other, named, unnamed, seven = text(r, "watch.pids").split()
    many = text(r, "many.pids").split()
    units = dict(line.split() for line in text(r, "units").splitlines() if len(line.split()) == 2)
    ticks = r"-\d+\.scope"
    assert re.fullmatch(rf"ffrtmp-shell-{before}{ticks}", units.get(before, "")), said  # the /proc pass
    assert re.fullmatch(rf"ffrtmp-shell-{shell}{ticks}", units.get(shell, "")), said
    assert re.fullmatch(rf"ffrtmp-svc-{named}{ticks}", units.get(named, "")), said  # its rule names the unit
    assert re.fullmatch(rf"ffrtmp-seven-{seven}{ticks}", units.get(seven, "")), said
    assert all(re.fullmatch(rf"ffrtmp-many-{p}{ticks}", units.get(p, "")) for p in many), said
    assert units[unnamed] == "watch-other.service" and units[other] == "w-other.scope", units
    scopes = {s.split()[0]: s.split()[1:] for s in text(r, "scopes").splitlines()}
    assert len(scopes) == 4 + len(many), scopes  # each adopted once, nothing else
    assert scopes[units[shell]][:2] == ["50000_100000", str(64 << 20)]
    assert scopes[units[named]][1] == str(32 << 20) and scopes[units[many[0]]][2] == "50"


def test_fifty_started_at_once_are_each_adopted_exactly_once(boot: Boot) -> None:
    r = boot["watch"]
    pids = text(r, "fifty.pids").split()
    assert len(pids) == 50 and (text(r, "fifty.scopes"), text(r, "fifty.matched")) == ("50", "50")
    said = text(r, "watch.err")
    ms = sorted(float(m) for m in re.findall(r"job fifty-\d+-\d+ governed ([0-9.]+) ms after its exec", said))
    assert len(ms) == 50, said
    print(f"VM (TCG, emulated): exec -> governed over 50 at once: p50 {ms[25]:.0f} ms, p99 {ms[49]:.0f} ms")


def test_adopted_jobs_record_their_real_exit_status(boot: Boot) -> None:
    r = boot["watch"]
    before, shell, _other, named, _unnamed, seven = text(r, "watch.pids").split()
    records = {
        p.name.rsplit("-", 1)[0]: json.loads(p.read_text()) for p in (r.files / "results").glob("*.json")
    }
    assert {
        k: (v["exit_code"], v["signal"])
        for k, v in records.items()
        if k.split("-")[0] not in ("many", "fifty")
    } == {
        f"shell-{shell}": (None, 15),
        f"svc-{named}": (None, 9),
        f"seven-{seven}": (7, None),
        f"shell-{before}": (None, None),  # still running when watch stopped: detached
    }, text(r, "watch.err")
    job = records[f"shell-{shell}"]
    assert (job["mode"], job["pid"], job["intent"], job["governed"]) == ("attach", int(shell), "test", True)
    assert records[f"svc-{named}"]["origin_unit"] == "watch-named.service"
    assert records[f"shell-{before}"]["platform_sla_reason"] == "detached_workload_continues"
    assert text(r, "watch.rc") == "0" and text(r, "before.after").startswith(f"ffrtmp-shell-{before}-")


def test_a_live_rtmp_receiver_is_governed_as_it_starts_and_loses_no_frame(boot: Boot) -> None:
    r = boot["watch"]
    said = text(r, "rtmp-watch.err") + text(r, "receiver.err")
    pid = text(r, "receiver.pid")
    assert re.fullmatch(rf"ffrtmp-rtmp-{pid}-\d+\.scope", text(r, "receiver.unit")), said
    assert text(r, "sender.unit") == "w-sender.scope"  # no -listen: not matched
    assert text(r, "receiver.limits").split() == ["50000", "100000", str(256 << 20)]
    assert (text(r, "sender.rc"), text(r, "receiver.rc"), text(r, "frames")) == ("0", "0", "200"), said
    job = json.loads(text(r, "rtmp.json"))
    assert (job["exit_code"], job["signal"], job["governed"], job["mode"]) == (0, None, True, "attach")
    assert job["platform_sla_reason"] == "completed_within_limits"
