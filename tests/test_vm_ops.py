"""The operator's side on a real host (the VM: journald, logind, a user manager): a job's story in the
journal under its unit, and `--user` governing a lingering user's jobs through their own manager."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
from typing import Any

import pytest
from vm import VM, Boot, Script

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

# Wait for a line in a file (bounded: 300 s), the event a script goes on from.
WAIT = """waitfor() { i=0; until grep -q "$2" "$1" 2>/dev/null; do
  i=$((i+1)); [ $i -gt 1500 ] && return 1; sleep 0.2; done; }"""
PROBE = 'd=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); echo "$d"; cat "$d/cpu.max" "$d/memory.max"'
SCRIPTS = [
    Script(
        "journal",
        f"""{WAIT}
sleep 600 & W=$!
ffrtmp attach --pid $W --job-id ja --cpu-quota 50 --force 2> "$OUT/attach.err" & A=$!
waitfor "$OUT/attach.err" "adopted into" || echo "attach never adopted"
journalctl --sync
systemctl status ffrtmp-ja.scope --no-pager -n 20 > "$OUT/status.txt"; echo "status=$?"
ffrtmp release ja 2> "$OUT/release.err"; echo "release=$?"
kill $W; wait $A; echo "attach=$?"
systemctl status ffrtmp-ja.scope --no-pager > "$OUT/status-after.txt" 2>&1; echo "status_after=$?"
ffrtmp run --job-id jr -- sh -c 'exit 3' 2> "$OUT/run.err"; echo "run=$?"
journalctl --sync
journalctl --no-pager -o cat -u ffrtmp-ja.scope > "$OUT/unit-ja.txt"
journalctl --no-pager -o cat -u ffrtmp-jr.scope > "$OUT/unit-jr.txt"
journalctl --no-pager -o json FFRTMP_JOB_ID=ja > "$OUT/ja.json"
journalctl --no-pager -o json FFRTMP_JOB_ID=jr > "$OUT/jr.json"
""",
    ),
    Script(
        "user",
        f"""{WAIT}
useradd -m u1 && loginctl enable-linger u1 && U=$(id -u u1) && systemctl start user@$U.service
as() {{ runuser -u u1 -- env XDG_RUNTIME_DIR=/run/user/$U "$@"; }}
cat /sys/fs/cgroup/user.slice/user-$U.slice/user@$U.service/cgroup.controllers > "$OUT/delegated.txt"
ffrtmp ls --all --json > "$OUT/root-ls-before.json"
probe='{PROBE}'
as ffrtmp --user run --job-id uj --cpu-quota 50 --memory-max 64M --io-weight 200 -- sh -c "$probe" \\
  > "$OUT/user-run.txt" 2> "$OUT/user-run.err"; echo "user_run=$?"
cp /home/u1/.local/state/ffrtmp/results/uj.json "$OUT/uj.json"
stat -c %U /home/u1/.local/state/ffrtmp/results/uj.json
as ffrtmp --user run --job-id ulong -- sleep 600 2> "$OUT/long.err" &
waitfor "$OUT/long.err" "started in" || echo "the long user job never started"
as ffrtmp --user ls --json > "$OUT/user-ls.json"; echo "user_ls=$?"
as ffrtmp --user ls --all --json > "$OUT/user-ls-all.json"
ffrtmp ls --all --json > "$OUT/root-ls-after.json"
as systemctl --user is-active ffrtmp-ulong.scope
journalctl --sync
as systemctl --user status ffrtmp-ulong.scope --no-pager > "$OUT/user-status.txt"
pkill -u u1 -x sleep; wait; echo "long=done"
as sh -c 'echo $$ > /tmp/uw.pid; exec sleep 600' & waitfor /tmp/uw.pid . ; UW=$(cat /tmp/uw.pid)
as ffrtmp --user attach --pid $UW --job-id ua0 2> "$OUT/uattach-refused.err"; echo "uattach_refused=$?"
as ffrtmp --user attach --pid $UW --job-id ua --memory-max 32M --force 2> "$OUT/uattach.err" &
waitfor "$OUT/uattach.err" "adopted into" || echo "the user's attach never adopted"
cut -d: -f3 /proc/$UW/cgroup > "$OUT/uattach-cgroup.txt"
kill $UW; wait; echo "uattach=done"
journalctl --sync
journalctl --no-pager -o json FFRTMP_JOB_ID=uj > "$OUT/uj-journal.json"
""",
    ),
]


@pytest.fixture(scope="module")
def boot(vm: VM) -> Boot:
    return vm.boot(SCRIPTS)


def _entries(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_running_attach_jobs_start_line_is_in_systemctl_status(boot: Boot) -> None:
    r = boot["journal"]
    assert "status=0" in r.stdout, (r.stdout, r.stderr)
    status = (r.files / "status.txt").read_text()
    start = (r.files / "attach.err").read_text().splitlines()[0]
    assert "adopted into ffrtmp-ja.scope" in start
    assert start in status  # under the unit, as journald shows it
    assert "Active: active" in status


def test_after_the_scope_is_gone_journalctl_u_shows_the_summary(boot: Boot) -> None:
    r = boot["journal"]
    assert "attach=0" in r.stdout and "status_after=4" in r.stdout, r.stdout
    lines = (r.files / "attach.err").read_text().splitlines()
    summary = [line for line in lines if line.startswith("JOB ja | mode=attach")]
    assert len(summary) == 1
    assert summary[0] in (r.files / "unit-ja.txt").read_text().splitlines()
    run = (r.files / "run.err").read_text().splitlines()
    assert "run=3" in r.stdout and len(run) == 2
    assert set(run) <= set((r.files / "unit-jr.txt").read_text().splitlines())


def test_the_job_id_field_finds_the_whole_story_with_its_fields(boot: Boot) -> None:
    r = boot["journal"]
    ja = _entries((r.files / "ja.json").read_text())
    attach = (r.files / "attach.err").read_text().splitlines()
    release = (r.files / "release.err").read_text().splitlines()
    assert "release=0" in r.stdout and release == ["ffrtmp: limits of ffrtmp-ja.scope lifted"]
    assert [e["MESSAGE"] for e in ja] == [attach[0], *release, *attach[1:]]  # in the order they happened
    for e in ja:
        assert e["OBJECT_SYSTEMD_UNIT"] == "ffrtmp-ja.scope" and e["FFRTMP_UNIT"] == "ffrtmp-ja.scope"
        assert e["_UID"] == "0" and e["SYSLOG_IDENTIFIER"] == "ffrtmp"
    assert [e.get("FFRTMP_MODE") for e in ja] == ["attach", None, "attach"]
    assert (ja[-1]["FFRTMP_VERDICT"], ja[-1]["FFRTMP_REASON"]) == ("compliant", "completed_within_limits")
    jr = _entries((r.files / "jr.json").read_text())
    assert [e["MESSAGE"] for e in jr] == (r.files / "run.err").read_text().splitlines()
    assert (jr[-1]["FFRTMP_EXIT_CODE"], jr[-1]["FFRTMP_REASON"]) == ("3", "workload_failed_platform_ok")


def test_user_run_is_governed_by_the_users_manager_with_its_delegated_limits(boot: Boot) -> None:
    r = boot["user"]
    assert "user_run=0" in r.stdout, (r.stdout, r.stderr)
    assert (r.files / "delegated.txt").read_text().split() == ["cpu", "memory", "pids"]
    cgroup, cpu_max, _period, memory_max = (r.files / "user-run.txt").read_text().split()
    assert cgroup.startswith("/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/ffrtmp.slice/")
    assert cgroup.endswith("/ffrtmp-uj.scope")
    assert (cpu_max, memory_max) == ("50000", str(64 * 1024 * 1024))
    rec = json.loads((r.files / "uj.json").read_text())
    assert rec["governed"] is True and rec["platform_sla_reason"] == "completed_within_limits"
    # io is not delegated to a user manager: the record and the wrapper's line say so
    assert (
        rec["governance_error"] == "not enforced: io-weight (controller io not delegated to the user manager)"
    )
    assert f"ffrtmp: job uj: {rec['governance_error']}" in (r.files / "user-run.err").read_text()
    assert "u1" in r.stdout.split()  # the record belongs to the user


def test_user_ls_lists_only_the_users_jobs_and_roots_ls_is_unchanged(boot: Boot) -> None:
    r = boot["user"]
    assert "user_ls=0" in r.stdout, r.stdout
    live = json.loads((r.files / "user-ls.json").read_text())
    assert [j["job_id"] for j in live["running"]] == ["ulong"]
    assert live["running"][0]["mode"] == "run"  # its contract found in the user's state directory
    done = json.loads((r.files / "user-ls-all.json").read_text())
    assert [x["job_id"] for x in done["results"]] == ["uj"]
    assert (r.files / "root-ls-before.json").read_text() == (r.files / "root-ls-after.json").read_text()
    assert "active" in r.stdout.split() and "long=done" in r.stdout


def test_user_jobs_journal_entries_are_tied_to_the_user_unit(boot: Boot) -> None:
    entries = _entries((boot["user"].files / "uj-journal.json").read_text())
    assert entries[0]["MESSAGE"].startswith("ffrtmp: job uj started in ffrtmp-uj.scope")
    assert entries[-1]["FFRTMP_REASON"] == "completed_within_limits" and len(entries) == 3
    for e in entries:
        assert e["USER_UNIT"] == "ffrtmp-uj.scope" and e["_UID"] == "1000" and "OBJECT_SYSTEMD_UNIT" not in e


def test_user_attach_adopts_the_users_own_process_into_the_user_manager(boot: Boot) -> None:
    r = boot["user"]
    assert "uattach=done" in r.stdout, (r.stdout, r.stderr)
    # a process outside the user's manager (here: in the test runner's system service) needs --force
    assert "uattach_refused=1" in r.stdout
    refused = (r.files / "uattach-refused.err").read_text()
    assert refused.startswith("ffrtmp: PID ") and "is not under the user manager" in refused
    cgroup = (r.files / "uattach-cgroup.txt").read_text().strip()
    assert cgroup == "/user.slice/user-1000.slice/user@1000.service/ffrtmp.slice/ffrtmp-ua.scope"
    lines = (r.files / "uattach.err").read_text().splitlines()
    assert lines[-1].startswith("JOB ua | mode=attach") and "reason=completed_within_limits" in lines[-1]


def test_the_user_sees_the_start_line_in_systemctl_user_status(boot: Boot) -> None:
    r = boot["user"]
    start = (r.files / "long.err").read_text().splitlines()[0]
    assert start.startswith("ffrtmp: job ulong started in ffrtmp-ulong.scope")
    assert start in (r.files / "user-status.txt").read_text()
