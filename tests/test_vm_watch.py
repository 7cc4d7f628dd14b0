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

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(1500)]
SCENARIO = Path(__file__).parent / "vm_scenarios" / "watch.sh"


@pytest.fixture(scope="module")
def boot(vm: VM) -> Boot:
    return vm.boot([Script("watch", SCENARIO.read_text())])


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
    assert (text(r, "check.rc"), text(r, "check.out")) == ("0", "/root/watch.toml: 3 rules, valid")
    before, shell, other, named, unnamed = text(r, "watch.pids").split()
    units = dict(line.split() for line in text(r, "units").splitlines())
    ticks = r"-\d+\.scope"
    assert re.fullmatch(rf"ffrtmp-shell-{before}{ticks}", units[before]), units  # the /proc pass at start
    assert re.fullmatch(rf"ffrtmp-shell-{shell}{ticks}", units[shell]), units
    assert re.fullmatch(rf"ffrtmp-svc-{named}{ticks}", units[named]), units  # the rule naming its unit
    assert units[unnamed] == "watch-other.service" and not units[other].startswith("ffrtmp-"), units
    scopes = dict((s.split()[0], s.split()[1:]) for s in text(r, "scopes").splitlines())
    assert len(scopes) == 3, scopes
    assert scopes[units[shell]] == ["50000_100000", str(64 << 20)]
    assert scopes[units[named]][-1] == str(32 << 20)
    records = {p.name: json.loads(p.read_text()) for p in (r.files / "results").glob("*.json")}
    (shell_job,) = [v for k, v in records.items() if k.startswith(f"shell-{shell}-")]
    assert shell_job["mode"] == "attach" and shell_job["pid"] == int(shell) and shell_job["intent"] == "test"
    assert text(r, "watch.rc") == "0"
