"""ffrtmp on a real Debian 12 host (systemd as PID 1, pure cgroup v2): limits as systemd-run puts
them, release, OOM in run and attach, live values, a non-root user, the README's unit installation
across a restart and a reboot (the agent) with watch rules (an OOM kill of an adopted process, live RTMP
streams through a kill -9 of the agent), a live RTMP stream adopted mid-stream, scripts/demo.sh.

One boot runs every scenario script of tests/vm_scenarios/ (they record what they see in $OUT);
a second boot is the reboot. The tests here only judge what came back."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from vm import VM, Boot, Result, Script

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(1500)]
SCENARIOS = Path(__file__).parent / "vm_scenarios"
LIMIT_FILES = ("cpu.max", "cpu.weight", "memory.max", "io.max", "io.weight")
FROM_EVENT = "exit status from its exit event"


def script(name: str) -> Script:
    return Script(name, (SCENARIOS / f"{name}.sh").read_text())


@pytest.fixture(scope="module")
def boot(vm: VM) -> Boot:
    return vm.boot([script("product"), script("units"), script("rtmp"), script("demo")])


@pytest.fixture(scope="module")
def reboot(vm: VM, boot: Boot) -> Boot:
    return vm.boot([script("units-reboot")])


def text(r: Result, name: str) -> str:
    """A file the scenario left, stripped; "" if it did not write it (e.g. a cgroup file that is gone)."""
    path = r.files / name
    return path.read_text().strip() if path.exists() else ""


def record(r: Result, job: str) -> dict[str, Any]:
    return dict(json.loads((r.files / "results" / f"{job}.json").read_text()))


def counters(scrape: str) -> dict[str, float]:
    """The counters of a /metrics scrape (live gauges left out)."""
    out = {}
    for line in scrape.splitlines():
        m = re.fullmatch(r"(ffrtmp_\w+_total(?:\{[^}]*\})?) (\S+)", line)
        if m:
            out[m[1]] = float(m[2])
    return out


def test_the_host_is_systemd_on_pure_cgroup_v2(boot: Boot) -> None:
    host = text(boot["product"], "host").splitlines()
    assert host[:2] == ["systemd", "cgroup2fs"] and host[2].startswith("systemd 252 ")


def test_limits_land_exactly_as_systemd_run_puts_them(boot: Boot) -> None:
    r = boot["product"]
    assert r.status == 0, r.stderr
    ours = {f: text(r, f"ours.{f}") for f in LIMIT_FILES}
    assert ours == {f: text(r, f"ref.{f}") for f in LIMIT_FILES}
    assert ours["cpu.max"] == "50000 100000" and ours["cpu.weight"] == "200"
    assert ours["memory.max"] == str(64 << 20) and ours["io.weight"] == "default 300"
    assert re.fullmatch(r"\d+:\d+ rbps=1048576 wbps=2097152 riops=100 wiops=200", ours["io.max"])


def test_release_lifts_every_limit(boot: Boot) -> None:
    r = boot["product"]
    assert text(r, "release.out") == "ffrtmp: limits of ffrtmp-lim.scope lifted"
    lifted = {f: text(r, f"released.{f}") for f in LIMIT_FILES}
    # systemd turns the cpu controller off for a scope with no CPU setting left: its files go.
    assert lifted["cpu.max"] in ("", "max 100000") and lifted["cpu.weight"] in ("", "100")
    assert lifted["memory.max"] == "max" and lifted["io.max"] == "" and lifted["io.weight"] == "default 100"
    assert record(r, "lim")["limits_released_at"] is not None


def test_ls_and_the_exporter_show_cpu_seconds_and_memory(boot: Boot) -> None:
    r = boot["product"]
    (lim,) = [j for j in json.loads(text(r, "ls.json"))["running"] if j["job_id"] == "lim"]
    assert lim["cpu_seconds"] > 0 and lim["memory_bytes"] > 0  # the job burnt some CPU first
    row = text(r, "ls.txt").splitlines()[1].split()
    assert row[0] == "lim" and row[5] != "-" and re.fullmatch(r"[0-9.]+s", row[6])  # MEMORY, CPU
    metrics = text(r, "metrics.txt")
    cpu = re.search(r'^ffrtmp_job_cpu_seconds_total\{job_id="lim",mode="run"\} (\S+)$', metrics, re.M)
    mem = re.search(r'^ffrtmp_job_memory_bytes\{job_id="lim",mode="run"\} (\S+)$', metrics, re.M)
    assert cpu and float(cpu[1]) > 0 and mem and float(mem[1]) > 0


def test_an_oom_killed_child_leaves_the_rest_of_the_run_job_running(boot: Boot) -> None:
    r = boot["product"]
    assert text(r, "oomc.rc") == "7", text(r, "oomc.err")  # the shell's own status, not 143
    assert text(r, "oomc.out").split() == ["continue", "child=137", "sibling=alive"]
    res = record(r, "oomc")
    assert res["oom_killed"] is True and res["exit_code"] == 7 and res["platform_sla_reason"] == "oom_killed"
    # The same job in a scope with systemd's default OOMPolicy: stopped whole (the shell got SIGTERM).
    assert text(r, "oomref.rc") == "143"


def test_an_adopted_parent_outlives_its_oom_killed_child(boot: Boot) -> None:
    r = boot["product"]
    assert text(r, "aoom.parent.out").split() == ["child=137", "bye"]
    assert text(r, "aoom.parent") == "alive" and text(r, "aoom.parent.rc") == "0"
    assert sorted(text(r, "aoom.show").split()) == ["ActiveState=active", "OOMPolicy=continue"]
    assert text(r, "aoom.rc") == "0"
    res = record(r, "aoom")
    assert res["oom_killed"] is True and res["platform_sla_reason"] == "oom_killed"


def test_a_job_whose_only_process_is_the_victim_is_recorded_oom_killed(boot: Boot) -> None:
    """systemd removes the cgroup at once, often before its counter is read: the kernel's log still says.
    Also a limit below what any exec needs (killed during the exec)."""
    r = boot["product"]
    for job in ("hog1", "hog2", "hog3", "tiny4K", "tiny1"):
        assert text(r, f"{job}.rc") == "137", text(r, f"{job}.err")
        res = record(r, job)
        assert (res["signal"], res["oom_killed"], res["platform_sla_reason"]) == (9, True, "oom_killed"), job


def test_an_adopted_process_that_is_the_victim_is_recorded_oom_killed(boot: Boot) -> None:
    r = boot["product"]
    assert text(r, "ahog.pid.rc") == "137" and text(r, "ahog.rc") == "0", text(r, "ahog.err")
    res = record(r, "ahog")
    assert (res["oom_killed"], res["platform_sla_reason"]) == (True, "oom_killed")


def test_a_user_without_a_polkit_rule_runs_ungoverned_with_one_line(boot: Boot) -> None:
    r = boot["product"]
    assert text(r, "user.rc") == "3" and text(r, "user.out") == "workload-ran"
    lines = text(r, "user.err").splitlines()
    assert len(lines) == 2 and "runs UNGOVERNED" in lines[0] and "AccessDenied" in lines[0]
    assert lines[1].startswith("JOB u | mode=run")
    res = json.loads(text(r, "user.json"))
    assert res["governed"] is False and res["platform_sla_reason"] == "governance_unavailable"


def test_the_readme_installs_an_agent_that_every_job_goes_through(boot: Boot) -> None:
    """The README's steps as written give the installed mode: the socket starts the agent, every `run`
    says agent (unless told FFRTMP_AGENT_SOCKET=none), across a restart of the agent."""
    r = boot["units"]
    assert r.status == 0, r.stderr
    assert text(r, "steps.sh").startswith("python3 -m venv /usr/local/lib/ffrtmp")
    assert "+ systemctl enable --now ffrtmp.socket ffrtmp-agent.service\n" in text(r, "steps.err")
    assert "path=/usr/local/bin/ffrtmp ;" in text(r, "execstart")
    starts = dict(
        re.findall(
            r"^ffrtmp: job (\S+) (?:started in \S+|runs UNGOVERNED) \(pid \d+(?:, )?([a-z-]*)\)",
            text(r, "jobs.err"),
            re.M,
        )
    )
    assert starts == {"ok": "agent", "fails": "agent", "ungoverned": "", "kmsg": "agent", "khog": "agent",
                      "after-restart": "agent"}  # fmt: skip
    assert "Active: active (running)" in text(r, "status.txt")
    assert text(r, "pid.before") != text(r, "pid.restarted")


def test_the_agent_has_its_hardening_and_reads_the_kernel_log(boot: Boot) -> None:
    """CAP_SYSLOG, CAP_DAC_OVERRIDE, CAP_NET_ADMIN, CAP_SYS_PTRACE only, no new privileges, seccomp; /dev/kmsg
    open while a job runs (kernel.dmesg_restrict=1), and an OOM kill through the agent recorded oom_killed."""
    r = boot["units"]
    caps = f"{(1 << 1) | (1 << 12) | (1 << 19) | (1 << 34):016x}"  # + NET_ADMIN, SYS_PTRACE: watch rules
    status = dict(ln.split(":\t", 1) for ln in text(r, "agent.status").splitlines())
    assert status == {"CapEff": caps, "CapBnd": caps, "NoNewPrivs": "1", "Seccomp": "2"}
    assert text(r, "dmesg_restrict") == "1" and text(r, "kmsg") == "1"
    assert text(r, "khog.rc") == "137"
    res = json.loads(text(r, "khog.json"))
    assert (res["oom_killed"], res["platform_sla_reason"]) == (True, "oom_killed")


def test_the_installed_agent_serves_metrics_at_once_and_keeps_its_counters(boot: Boot) -> None:
    r = boot["units"]
    # Every step as written succeeds, the last too: curl at once (Type=notify: started means serving).
    assert text(r, "steps.rc") == "0", text(r, "steps.err")
    assert text(r, "steps.err").endswith("+ curl -s http://127.0.0.1:9464/metrics")
    assert 'ffrtmp_jobs_total{state="completed"} 0.0' in text(r, "steps.out")
    before = counters(text(r, "before.txt"))
    assert before['ffrtmp_jobs_total{state="completed"}'] == 5
    assert before['ffrtmp_platform_sla_violations_total{reason="governance_unavailable"}'] == 1
    assert before['ffrtmp_platform_sla_violations_total{reason="oom_killed"}'] == 1
    assert before['ffrtmp_jobs_by_exit_total{exit="non_zero"}'] == 2
    assert counters(text(r, "restarted.txt")) == before
    assert [v["job_id"] for v in json.loads(text(r, "violations.json"))] == ["khog", "ungoverned"]


def test_the_agent_comes_back_after_a_reboot(reboot: Boot) -> None:
    r = reboot["units-reboot"]
    assert r.status == 0, r.stderr
    assert text(r, "active").split() == ["active", "active"]
    assert text(r, "enabled").split() == ["enabled", "enabled"]
    assert text(r, "job.rc") == "0"
    assert re.search(r"job rebooted started in ffrtmp-rebooted.scope \(pid \d+, agent\)", text(r, "job.err"))


def test_the_agent_keeps_its_counters_across_a_reboot(reboot: Boot) -> None:
    r = reboot["units-reboot"]
    before = counters(text(r, "before-reboot.txt"))
    assert before and counters(text(r, "after-reboot.txt")) == before


def test_a_live_rtmp_receiver_adopted_mid_stream_gets_every_frame(boot: Boot) -> None:
    r = boot["rtmp"]
    assert r.status == 0, r.stderr + text(r, "attach.err")
    assert int(text(r, "size-at-attach")) > 0  # the stream was flowing when it was adopted
    assert text(r, "sender.rc") == text(r, "receiver.rc") == text(r, "attach.rc") == "0"
    assert text(r, "frames") == "200"  # 20 s at 10 fps: none lost
    assert text(r, "procs").split() == [text(r, "receiver.pid")]
    assert text(r, "cpu.max") == "50000 100000" and text(r, "memory.max") == str(256 << 20)
    res = json.loads(text(r, "rtmp.json"))
    assert res["governed"] is True and res["origin_unit"] == "receiver.scope"
    assert res["platform_sla_reason"] == "completed_within_limits"


def test_the_demo_takes_its_host_branch_and_receives_every_frame(boot: Boot) -> None:
    r = boot["demo"]
    assert text(r, "demo.rc") == "0", text(r, "demo.err")
    assert "The stream was never interrupted: 240 of 240 frames received" in text(r, "demo.out")
    journal = text(r, "journal")
    assert "Started ffrtmp-demo-attach.scope" in journal and "Started ffrtmp-demo-run.scope" in journal


def test_the_installed_agent_adopts_by_watch_rules_and_resumes_them_after_kill_9(boot: Boot) -> None:
    """Watch rules in the agent (a drop-in naming them): a process started by a shell unrelated to ffrtmp is
    governed with the rule's limit and its real exit status recorded; the agent killed -9 while it governs
    another: the process stays governed, the restarted agent resumes the job and freezes it once."""
    r = boot["units"]
    why = " | ".join(text(r, f) for f in ("aw1.cgroup", "aw1.unit", "aw1.memory.err", "aw.journal"))
    assert text(r, "aw1.memory") == str(64 << 20), why
    assert text(r, "aw1.rc") == "7"
    res = json.loads(text(r, "aw1.json"))
    assert (res["mode"], res["governed"], res["exit_code"], res["signal"]) == ("attach", True, 7, None), res
    assert res["job_id"].startswith("aw-") and res["limits"] == {"memory_max": 64 << 20}
    assert text(r, "aw.agent.before") != text(r, "aw.agent.after")
    assert text(r, "aw2.still") == "yes"  # governed through the agent's death
    assert (text(r, "aw2.count"), text(r, "aw2.contracts")) == ("1", "0")
    res2 = json.loads(text(r, "aw2.json"))
    # it exited after the restart: the restarted agent expected its exit event (Watcher.expect)
    assert (res2["governed"], res2["exit_code"], res2["platform_sla_reason"]) == (
        True,
        7,
        "workload_failed_platform_ok",
    )
    assert (
        res2["governance_error"]
        == f"resumed: wrapper PID {text(r, 'aw.agent.before')} was gone; exit status from its exit event"
    ), res2
    assert res["origin"] == res2["origin"] == "watch:aw"


def test_an_oom_kill_of_a_process_a_watch_rule_adopted_is_in_its_record(boot: Boot) -> None:
    """The rule's memory-max (40M), then the adopted process allocates 300M: the kernel kills it (signal 9),
    its record and its summary say oom_killed."""
    r = boot["units"]
    assert text(r, "aoom.rc") == "137", text(r, "aoom.show")
    res = json.loads(text(r, "aoom.json") or "{}")
    pid = res.get("pid")
    keys = ("mode", "origin", "governed", "exit_code", "signal", "oom_killed", "limits")
    want = ["attach", "watch:aoom", True, None, 9, True, {"memory_max": 40 << 20}]
    assert [res.get(k) for k in keys] == want, res
    assert (res["platform_sla_compliant"], res["platform_sla_reason"]) == (False, "oom_killed")
    shown = text(r, "aoom.show").splitlines()
    assert re.fullmatch(
        rf"JOB aoom-{pid}-\d+ \| mode=attach \| intent=- \| sla=VIOLATION \| reason=oom_killed \| "
        rf"runtime=[0-9.]+s \| exit=- \| pid={pid} \| unit=ffrtmp-aoom-{pid}-\d+\.scope",
        shown[0],
    ), shown
    assert "  signal: 9 (SIGKILL)" in shown and "  oom_killed: yes" in shown, shown


def test_live_rtmp_streams_a_rule_adopted_lose_no_frame_to_a_kill_9_of_the_agent(boot: Boot) -> None:
    """Two live RTMP receivers adopted by a watch rule of the installed agent, fed in real time; the agent
    killed -9 mid-stream: every frame arrives, the restarted agent resumes both jobs (the same scopes, the
    rule's limits still in their cgroup files) and freezes each once at its end, with the exit status."""
    r = boot["units"]
    pids = text(r, "live.pids").split()
    agent = text(r, "aw.agent.before")
    print(f"VM (TCG): the agent killed -9 was back in {text(r, 'restart.seconds')} s; boot {boot.seconds} s")
    print("marks:", text(r, "marks"))
    alive = text(r, "live.after-restart").splitlines()
    assert len(pids) == 2 and alive == [f"{p} alive" for p in pids], text(r, "aw.journal")
    scopes = {line.split()[0]: line.split()[1:] for line in text(r, "live.scopes").splitlines()}
    for p in pids:
        unit, cpu, mem = scopes[p]
        assert re.fullmatch(rf"ffrtmp-live-{p}-\d+\.scope", unit), scopes
        assert (cpu, mem) == ("50000_100000", str(256 << 20))
    why = " | ".join(text(r, f) for f in ("send2.err", "send3.err", "live2.err", "live3.err"))
    assert text(r, "senders.rc").split() == text(r, "live.rc").split() == ["0", "0"], why
    assert text(r, "live.frames").split() == ["600", "600"], why  # 60 s at 10 fps each: none lost
    assert text(r, "live.counts").splitlines() == [f"{p} 1 0" for p in pids]  # one result, no contract left
    for p in pids:
        res, unit = json.loads(text(r, f"live-{p}.json")), scopes[p][0]
        assert (res["origin"], res["governed"], res["exit_code"], res["signal"], res["unit"]) == (
            "watch:live",
            True,
            0,
            None,
            unit,
        ), res
        assert res["governance_error"] == f"resumed: wrapper PID {agent} was gone; {FROM_EVENT}"
        assert res["platform_sla_reason"] == "completed_within_limits"
        assert res["limits"] == {"cpu_quota_per_sec_usec": 500000, "memory_max": 256 << 20}, res
        assert re.fullmatch(
            rf"JOB live-{p}-\d+ \| mode=attach \| intent=- \| sla=COMPLIANT \| "
            rf"reason=completed_within_limits \| runtime=[0-9.]+s \| exit=0 \| pid={p} \| unit={unit}",
            text(r, f"live-{p}.summary"),
        ), text(r, f"live-{p}.summary")


def test_a_run_job_resumed_by_the_restarted_agent_has_the_exit_status_of_its_exit_event(boot: Boot) -> None:
    """`ffrtmp run`'s client killed -9, then the agent: the restarted agent (with process events: it runs
    watch rules) resumes the job and records the workload's exit 5, not 'exit status unknown'."""
    r = boot["units"]
    started = r"^ffrtmp: job rr started in ffrtmp-rr\.scope \(pid \d+, agent\)"
    assert re.search(started, text(r, "rr.err"), re.M), text(r, "rr.err")
    res = json.loads(text(r, "rr.json") or "{}")
    got = (res.get("mode"), res.get("governed"), res.get("exit_code"), res.get("signal"))
    assert got == ("run", True, 5, None), res
    assert res["governance_error"] == f"resumed: wrapper PID {text(r, 'rr.pid')} was gone; {FROM_EVENT}", res
    assert res["platform_sla_reason"] == "workload_failed_platform_ok"


def test_a_plain_attach_through_an_agent_with_process_events_records_the_real_exit_status(boot: Boot) -> None:
    """The agent runs watch rules (process events): an `ffrtmp attach` it serves gets the exit status."""
    r = boot["units"]
    assert text(r, "at.workload.rc") == "7" and text(r, "at.rc") == "0", text(r, "at.err")
    res = json.loads(text(r, "at.json") or "{}")
    got = (res.get("mode"), res.get("governed"), res.get("exit_code"), res.get("signal"), res.get("origin"))
    assert got == ("attach", True, 7, None, None), res
    assert (res["platform_sla_reason"], res["governance_error"]) == ("workload_failed_platform_ok", None), res
    assert "JOB plain-at | mode=attach" in text(r, "at.err") and "| exit=7 |" in text(r, "at.err"), text(
        r, "at.err"
    )
