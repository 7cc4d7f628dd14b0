"""`ffrtmp exporter` in a real systemd sandbox: counters from results, live gauges, /violations,
orphans reconciled on UnitRemoved, `promtool check metrics`, and a real Prometheus scraping it."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Ffrtmp, orphan, result_of, wait_for, wakeups
from helpers import HOG, Exporter, free_port, get, prometheus, samples, scalar, scraped, value
from sandbox import Sandbox

from ffrtmp_systemd.report.result import Contract, Mode, Outcome, Reason, freeze, rfc3339, to_json
from ffrtmp_systemd.report.store import Store


def fake_result(
    store: Store, job: str, end: datetime, reason: Reason, exit_code: int | None, origin: str | None = None
) -> None:
    """A frozen record as the wrapper writes it (the exporter only reads files)."""
    start = rfc3339(end - timedelta(seconds=3))
    c = Contract(job, Mode.ATTACH, 4242, f"ffrtmp-{job}.scope", {}, None, 1, start, origin=origin)
    store.freeze(freeze(c, Outcome(end, exit_code=exit_code), True, None, reason))


def test_counters_come_from_the_results_and_survive_a_restart(
    sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path, exporter: Exporter
) -> None:
    assert ffrtmp("run", "--job-id", "ok", "--", "true").returncode == 0
    assert ffrtmp("run", "--job-id", "fail", "--", "sh", "-c", "exit 3").returncode == 3
    assert (
        ffrtmp("run", "--job-id", "oom", "--memory-max", "50M", "--", "python3", "-c", HOG).returncode == 137
    )
    expected = {
        ("ffrtmp_jobs_total", "state", "started"): 3,
        ("ffrtmp_jobs_total", "state", "completed"): 3,
        ("ffrtmp_platform_sla_total", "compliant", "true"): 2,
        ("ffrtmp_platform_sla_total", "compliant", "false"): 1,
        ("ffrtmp_platform_sla_violations_total", "reason", "oom_killed"): 1,
        ("ffrtmp_platform_sla_violations_total", "reason", "observer_lost"): 0,
        ("ffrtmp_jobs_by_mode_total", "mode", "run"): 3,
        ("ffrtmp_jobs_by_mode_total", "mode", "attach"): 0,
        ("ffrtmp_jobs_by_exit_total", "exit", "0"): 1,
        ("ffrtmp_jobs_by_exit_total", "exit", "non_zero"): 2,
        ("ffrtmp_jobs_by_exit_total", "exit", "unknown"): 0,
    }
    m = exporter.metrics()
    assert {k: value(m, k[0], **{k[1]: k[2]}) for k in expected} == expected
    assert exporter.stop() == (0, "ffrtmp exporter: serving " + exporter.url + f"/metrics for {state_dir}\n")
    again = Exporter(sandbox, state_dir)
    try:
        m = again.metrics()
        assert {k: value(m, k[0], **{k[1]: k[2]}) for k in expected} == expected
    finally:
        again.stop()


def test_watch_adoptions_are_counted_by_rule_from_the_records(state_dir: Path, exporter: Exporter) -> None:
    assert value(exporter.metrics(), "ffrtmp_jobs_total", state="completed") == 0
    store, end = Store(state_dir), datetime.now(UTC)
    ok = Reason.COMPLETED_WITHIN_LIMITS
    for job, origin in (("w1", "watch:rtmp"), ("w2", "watch:rtmp"), ("w3", "watch:svc"), ("plain", None)):
        fake_result(store, job, end, ok, None, origin)
    m = exporter.metrics()
    watch = {dict(k[1])["rule"]: v for k, v in m.items() if k[0] == "ffrtmp_watch_jobs_total"}
    assert watch == {"rtmp": 2, "svc": 1}  # the attach without origin is not a rule's
    assert value(m, "ffrtmp_jobs_by_mode_total", mode="attach") == 4


def test_each_record_is_read_once_and_counters_never_go_down(
    ffrtmp: Ffrtmp, state_dir: Path, exporter: Exporter
) -> None:
    assert ffrtmp("run", "--job-id", "a", "--", "true").returncode == 0
    assert value(exporter.metrics(), "ffrtmp_jobs_total", state="completed") == 1
    record = state_dir / "results" / "a.json"
    record.chmod(0o644)  # fault injection: a counted record rewritten (and then removed) behind our back
    record.write_text(record.read_text().replace("completed_within_limits", "oom_killed"))
    m = exporter.metrics()
    assert value(m, "ffrtmp_platform_sla_violations_total", reason="oom_killed") == 0  # not read again
    record.unlink()
    m = exporter.metrics()
    assert value(m, "ffrtmp_jobs_total", state="completed") == 1
    assert value(m, "ffrtmp_platform_sla_total", compliant="true") == 1


def test_live_gauges_show_running_scopes(sandbox: Sandbox, state_dir: Path, exporter: Exporter) -> None:
    assert value(exporter.metrics(), "ffrtmp_running_jobs") == 0
    job = sandbox.spawn(
        ["ffrtmp", "run", "--state-dir", str(state_dir), "--job-id", "live", "--memory-max", "200M", "--",
         "python3", "-c", "import sys; b = bytearray(20 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(
            lambda: (
                (value(exporter.metrics(), "ffrtmp_job_memory_bytes", job_id="live", mode="run") or 0)
                > 20 << 20
            ),
            what="the job's memory gauge",
        )
        m = exporter.metrics()
        assert value(m, "ffrtmp_running_jobs") == 1 and value(m, "ffrtmp_systemd_up") == 1
        shown = sandbox.systemctl("show", "-p", "CPUUsageNSec", "--value", "ffrtmp-live.scope").stdout.strip()
        cpu = value(m, "ffrtmp_job_cpu_seconds_total", job_id="live", mode="run")
        assert (cpu is None) == (shown == "[not set]")  # present exactly when systemd reports it
    finally:
        job.communicate(b"", timeout=30)
    assert job.returncode == 0
    m = exporter.metrics()
    assert value(m, "ffrtmp_running_jobs") == 0
    assert value(m, "ffrtmp_job_memory_bytes", job_id="live", mode="run") is None


def test_violations_are_the_last_50_newest_first(state_dir: Path, exporter: Exporter) -> None:
    store = Store(state_dir)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(60):
        fake_result(store, f"v{i:02d}", t0 + timedelta(minutes=i), Reason.GOVERNANCE_LOST, None)
    fake_result(store, "fine", t0 + timedelta(hours=5), Reason.COMPLETED_WITHIN_LIMITS, 0)
    status, ctype, body = get(f"{exporter.url}/violations")
    assert (status, ctype) == (200, "application/json")
    got = json.loads(body)
    assert [v["job_id"] for v in got] == [f"v{i:02d}" for i in range(59, 9, -1)]
    assert got[0] == {
        "job_id": "v59",
        "reason": "governance_lost",
        "mode": "attach",
        "processing_seconds": 3.0,
        "exit_code": None,
        "pid": 4242,
        "end_time": "2026-01-01T00:59:00.000000Z",
    }
    assert value(exporter.metrics(), "ffrtmp_platform_sla_violations_total", reason="governance_lost") == 60


def test_healthz_and_unknown_paths(exporter: Exporter) -> None:
    assert get(f"{exporter.url}/healthz") == (200, "text/plain", "ok\n")
    assert get(f"{exporter.url}/nope")[0] == 404


def test_an_idle_exporter_sleeps(exporter: Exporter) -> None:
    """Nothing polls: no scrape, no scope ending, no wakeup (serve_forever's poll: 6 times)."""
    before = wakeups(exporter.host_pid)
    time.sleep(3)
    after = wakeups(exporter.host_pid)  # a thread that served the fixture's /healthz may end meanwhile
    woke = sum(n - before.get(task, 0) for task, n in after.items())
    assert woke <= 2, (before, after)  # 0 when idle; a late UnitRemoved of an earlier test may wake it
    assert exporter.healthy()


def test_bad_listen_address_is_a_usage_error(ffrtmp: Ffrtmp) -> None:
    r = ffrtmp("exporter", "--listen", "nonsense")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ffrtmp: --listen: expected HOST:PORT")


def test_orphan_is_reconciled_when_its_scope_is_removed(
    sandbox: Sandbox, state_dir: Path, exporter: Exporter, tmp_path: Path
) -> None:
    fifo = tmp_path / "go"
    orphan(sandbox, state_dir, "orphan", fifo)
    contract = state_dir / "jobs" / "orphan.json"
    assert contract.exists()
    assert value(exporter.metrics(), "ffrtmp_running_jobs") == 1  # the workload continues, governed
    assert not (state_dir / "results" / "orphan.json").exists()
    fifo.write_text("go\n")  # the workload ends; systemd unloads its scope (UnitRemoved)
    done = state_dir / "results" / "orphan.json"
    wait_for(lambda: done.exists() and not contract.exists(), what="the exporter to reconcile")
    res = result_of(state_dir, "orphan")
    assert res["platform_sla_reason"] == "observer_lost" and res["platform_sla_compliant"] is False
    assert res["exit_code"] is None and res["signal"] is None
    m = exporter.metrics()
    assert value(m, "ffrtmp_platform_sla_violations_total", reason="observer_lost") == 1
    assert value(m, "ffrtmp_jobs_by_exit_total", exit="unknown") == 1
    assert [v["job_id"] for v in json.loads(get(f"{exporter.url}/violations")[2])] == ["orphan"]


def test_it_answers_while_a_reconcile_waits_for_the_stores_lock(
    sandbox: Sandbox, state_dir: Path, exporter: Exporter, tmp_path: Path
) -> None:
    """The Reconciler's files and the store's lock are taken in a worker thread: a freeze that holds the
    lock (here: this test, for as long as it likes) never stops the exporter's event loop."""
    fifo = tmp_path / "go"
    orphan(sandbox, state_dir, "held", fifo)
    jobs = os.open(state_dir / "jobs", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(jobs, fcntl.LOCK_EX)
    try:
        fifo.write_text("go\n")  # the workload ends, the scope goes: the exporter reconciles, and waits
        waiter = f":{os.fstat(jobs).st_ino} "
        wait_for(
            lambda: any(
                "-> FLOCK" in ln and waiter in ln for ln in Path("/proc/locks").read_text().splitlines()
            ),
            what="the exporter's reconcile to wait for the lock",
        )
        assert get(f"{exporter.url}/healthz", timeout=5) == (200, "text/plain", "ok\n")
        assert value(exporter.metrics(), "ffrtmp_running_jobs") == 0
        assert not (state_dir / "results" / "held.json").exists()
    finally:
        os.close(jobs)
    wait_for(lambda: (state_dir / "results" / "held.json").exists(), what="the freeze once the lock is free")
    assert result_of(state_dir, "held")["platform_sla_reason"] == "observer_lost"


def test_promtool_accepts_the_output(ffrtmp: Ffrtmp, exporter: Exporter) -> None:
    assert ffrtmp("run", "--job-id", "p", "--", "true").returncode == 0
    body = get(f"{exporter.url}/metrics")[2]
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout + r.stderr == ""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_real_prometheus_scrapes_it(ffrtmp: Ffrtmp, exporter: Exporter, tmp_path: Path) -> None:
    assert ffrtmp("run", "--job-id", "good", "--", "true").returncode == 0
    assert (
        ffrtmp("run", "--job-id", "bad", "--memory-max", "50M", "--", "python3", "-c", HOG).returncode == 137
    )
    with prometheus(tmp_path, exporter) as base:
        wait_for(lambda: scraped(base, 'ffrtmp_jobs_total{state="completed"} == 2'), timeout=90,
                 what="prometheus to scrape")  # fmt: skip
        assert scalar(base, 'up{job="ffrtmp"}') == 1
        assert scalar(base, 'ffrtmp_platform_sla_total{compliant="true"}') == 1
        assert scalar(base, 'ffrtmp_platform_sla_violations_total{reason="oom_killed"}') == 1
        assert scalar(base, "sum(ffrtmp_platform_sla_violations_total)") == 1
        assert scalar(base, 'ffrtmp_jobs_by_exit_total{exit="non_zero"}') == 1
        assert scalar(base, "ffrtmp_running_jobs") == 0


# -- issue 10: bad records never stop the exporter; a hostile local user cannot starve it --
def test_bad_records_are_named_counted_and_never_fatal(sandbox: Sandbox, state_dir: Path) -> None:
    store = Store(state_dir)
    now = datetime.now(UTC)
    fake_result(store, "good", now, Reason.COMPLETED_WITHIN_LIMITS, 0)
    fake_result(store, "zero", now, Reason.OOM_KILLED, None)
    zero = state_dir / "results" / "zero.json"
    zero.chmod(0o644)  # fault injection: a result with "end_time": 0 (once: the exporter crashed at start)
    zero.write_text(json.dumps({**json.loads(zero.read_text()), "end_time": 0}))
    os.mkfifo(state_dir / "results" / "fifo.json")  # once: hung before it even listened
    (state_dir / "jobs").mkdir()
    os.mkfifo(state_dir / "jobs" / "fifo.json")
    c = Contract("yesterday", Mode.RUN, 4242, "ffrtmp-yesterday.scope", {}, None, 4242, rfc3339(now))
    (state_dir / "jobs" / "yesterday.json").write_text(to_json(c).replace(rfc3339(now), "yesterday"))
    ex = Exporter(sandbox, state_dir)
    try:
        # Contracts are looked at by the reconcile the exporter runs once it serves (worker threads):
        # counted a moment after the first scrape may answer.
        wait_for(lambda: value(ex.metrics(), "ffrtmp_bad_records_total", kind="contract") == 2,
                 what="the bad contracts counted")  # fmt: skip
        m = ex.metrics()
        assert value(m, "ffrtmp_bad_records_total", kind="result") == 2
        assert value(m, "ffrtmp_bad_records_total", kind="contract") == 2
        assert value(m, "ffrtmp_jobs_total", state="completed") == 1
        assert value(m, "ffrtmp_platform_sla_total", compliant="true") == 1
    finally:
        code, err = ex.stop()
    assert code == 0
    bad = sorted(ln for ln in err.splitlines() if "bad record" in ln)
    assert bad == [
        f"ffrtmp exporter: not counted: bad record {state_dir}/results/fifo.json: not a regular file",
        f"ffrtmp exporter: not counted: bad record {state_dir}/results/zero.json: "
        "end_time: 0 is not a valid str",
        f"ffrtmp: job fifo: not reconciled: bad record {state_dir}/jobs/fifo.json: not a regular file",
        f"ffrtmp: job yesterday: not reconciled: bad record {state_dir}/jobs/yesterday.json: "
        "start_time: 'yesterday' is not an RFC 3339 time",
    ]


IDLE = """
import resource, socket, struct, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for i in range(n):
    s = socket.create_connection((host, port))
    try:
        s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n")  # half a request, never finished
    except OSError:
        pass  # already dropped by the exporter: fine
    held.append(s)
print("holding", len(held), flush=True)
sys.stdin.readline()
for s in held[::2]:  # half of them end with a reset, as a client killed mid-request would
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
"""


def test_a_thousand_idle_connections_do_not_starve_a_scrape(sandbox: Sandbox, state_dir: Path) -> None:
    """All on loopback: an unprivileged user's half-sent requests once took 1,017 threads and every fd."""
    ex = Exporter(sandbox, state_dir)
    host, port = ex.url.removeprefix("http://").split(":")
    if shutil.which("ss"):  # iproute2: the listen backlog is its Send-Q (it was 5)
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
        assert int(listening.stdout.split()[2]) >= 128, listening.stdout
    idle = subprocess.Popen(
        [sys.executable, "-c", IDLE, host, port, "1000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert idle.stdout is not None and idle.stdin is not None
        assert idle.stdout.readline() == "holding 1000\n"
        with urllib.request.urlopen(f"{ex.url}/metrics", timeout=30) as r:  # answered, however long
            assert r.status == 200 and "ffrtmp_jobs_total" in r.read().decode()
        threads = len(os.listdir(f"/proc/{ex.host_pid}/task"))
        fds = len(os.listdir(f"/proc/{ex.host_pid}/fd"))
        assert threads <= 16 and fds <= 300, (threads, fds)
        idle.stdin.write("\n")
        idle.stdin.close()
        assert idle.wait(timeout=60) == 0
    finally:
        idle.kill()
        idle.wait()
    assert ex.healthy()
    code, err = ex.stop()
    assert code == 0 and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_an_untrusted_state_directory_is_refused_at_start(ffrtmp: Ffrtmp, state_dir: Path) -> None:
    state_dir.chmod(0o777)
    r = ffrtmp("exporter", "--listen", f"127.0.0.1:{free_port()}")
    why = "writable by group or others, mode 0777"
    assert (r.returncode, r.stderr) == (
        1,
        f"ffrtmp: refusing state directory {state_dir} ({why}): no record is kept there\n",
    )


# -- issue 11: the endpoints hosted in another process's event loop (the node agent's) --
HOSTED = """
import asyncio, sys, urllib.error, urllib.request
from pathlib import Path
from ffrtmp_systemd.endpoints import serve_http
from ffrtmp_systemd.report.store import Store

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()

async def main(listen, state):
    ep = await serve_http(listen, Store(Path(state)), lambda: None)  # a host that has no bus (now)
    url = "http://" + listen
    print("loaded before a scrape:", "prometheus_client" in sys.modules)
    print("healthz", *await asyncio.to_thread(get, url + "/healthz"), end="")
    print("metrics", *await asyncio.to_thread(get, url + "/metrics"), sep="\\n")
    ep.close()
    try:
        await asyncio.to_thread(get, url + "/healthz")
    except OSError:
        print("closed")

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_endpoints_serve_in_a_hosts_loop_with_its_bus_or_none(state_dir: Path) -> None:
    """serve_http as the agent calls it: no bus of its own; a host without a bus is unhealthy."""
    fake_result(Store(state_dir), "old", datetime.now(UTC), Reason.OOM_KILLED, None)
    listen = f"127.0.0.1:{free_port()}"
    r = subprocess.run(
        [sys.executable, "-c", HOSTED, listen, str(state_dir)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    head, metrics = r.stdout.split("metrics\n200\n")
    assert head == "loaded before a scrape: False\nhealthz 503 systemd bus lost\n"
    m = samples(metrics.removesuffix("closed\n"))
    assert value(m, "ffrtmp_systemd_up") == 0 and value(m, "ffrtmp_running_jobs") is None
    assert value(m, "ffrtmp_platform_sla_violations_total", reason="oom_killed") == 1
    assert r.stdout.endswith("closed\n")
    assert "live gauges unavailable: no connection to systemd" in r.stderr
