"""`ffrtmp ls` against a real systemd: running scopes as a table and as JSON, recent results with --all."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

from conftest import Ffrtmp, scopes, wait_for
from helpers import BLOCK, need_block
from sandbox import Sandbox

HEADER = "JOB  MODE  ORIGIN  STATE  PIDS  MEMORY  CPU  AGE  LIMITS\n"


def test_nothing_running(ffrtmp: Ffrtmp) -> None:
    r = ffrtmp("ls")
    assert (r.returncode, r.stdout) == (0, HEADER)
    r = ffrtmp("ls", "--json", "--all")
    assert json.loads(r.stdout) == {"running": [], "results": []}


def test_running_jobs_of_both_modes(sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path) -> None:
    env = {"FFRTMP_STATE_DIR": str(state_dir)}
    run = sandbox.spawn(
        ["ffrtmp", "run", "--job-id", "r1", "--memory-max", "100M", "--cpu-quota", "50", "--",
         "python3", "-c", "import sys; b = bytearray(8 << 20); sys.stdin.read()"],
        env=env, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sleeper = sandbox.spawn(["sleep", "300"])
    host_sleep, inner_sleep = sandbox.inner_pid(sleeper)
    attach = sandbox.spawn(
        ["ffrtmp", "attach", "--pid", str(inner_sleep), "--job-id", "a1"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: "ffrtmp-r1.scope" in scopes(sandbox) and "ffrtmp-a1.scope" in scopes(sandbox),
                 timeout=20, what="both scopes")  # fmt: skip
        doc = json.loads(ffrtmp("ls", "--json").stdout)
        assert doc["results"] == []
        a1, r1 = doc["running"]
        assert (a1["job_id"], a1["mode"], a1["unit"], a1["state"]) == (
            "a1",
            "attach",
            "ffrtmp-a1.scope",
            "active",
        )
        assert a1["pids"] == [inner_sleep] and a1["limits"] == {}
        assert (r1["job_id"], r1["mode"], r1["limits"]) == (
            "r1",
            "run",
            {"cpu_quota_per_sec_usec": 500000, "memory_max": 100 << 20},
        )
        assert len(r1["pids"]) == 1 and r1["memory_bytes"] > 0 and r1["since"].endswith("Z")
        assert r1["age_seconds"] >= 0
        lines = ffrtmp("ls").stdout.splitlines()
        assert lines[0].split() == [
            "JOB",
            "MODE",
            "ORIGIN",
            "STATE",
            "PIDS",
            "MEMORY",
            "CPU",
            "AGE",
            "LIMITS",
        ]
        assert lines[1].split()[:5] == ["a1", "attach", "-", "active", str(inner_sleep)]
        assert lines[2].split()[:5] == ["r1", "run", "-", "active", str(r1["pids"][0])]
        assert a1["origin"] is None and r1["origin"] is None
        assert lines[2].endswith("  cpu 50%, memory 100M")
    finally:
        run.communicate(b"", timeout=30)
        os.kill(host_sleep, signal.SIGKILL)
        sleeper.wait()
        attach.wait(timeout=30)


def test_all_adds_the_recent_results_newest_first(ffrtmp: Ffrtmp, state_dir: Path) -> None:
    for job, script in (("first", "exit 0"), ("second", "exit 4"), ("third", "exit 0")):
        ffrtmp("run", "--job-id", job, "--", "sh", "-c", script)
    out = ffrtmp("ls", "--all").stdout.split("\n\n")
    assert out[0] + "\n" == HEADER
    rows = [ln.split() for ln in out[1].splitlines()]
    assert rows[0] == ["JOB", "MODE", "ORIGIN", "SLA", "REASON", "EXIT", "RUNTIME", "ENDED"]
    assert [r[:6] for r in rows[1:]] == [
        ["third", "run", "-", "compliant", "completed_within_limits", "0"],
        ["second", "run", "-", "compliant", "workload_failed_platform_ok", "4"],
        ["first", "run", "-", "compliant", "completed_within_limits", "0"],
    ]
    doc = json.loads(ffrtmp("ls", "--all", "--json", "--last", "2").stdout)
    assert [r["job_id"] for r in doc["results"]] == ["third", "second"]
    assert doc["results"][1]["exit_code"] == 4 and doc["results"][1]["platform_sla_compliant"] is True
    assert json.loads(ffrtmp("ls", "--json").stdout)["results"] == []  # only with --all


REPRS = ("{'", "['", "('", "None", "True", "False", "<", "\\x")  # what str() of Python values shows


@need_block
def test_ls_and_show_never_print_a_python_repr(sandbox: Sandbox, ffrtmp: Ffrtmp, state_dir: Path) -> None:
    """Real jobs (an io-max limit, a command with spaces and quotes): every line as an operator writes it."""
    mm = next((mm for path, mm in BLOCK if "loop" not in path), BLOCK[0][1])
    command = ["sh", "-c", 'read x; echo "it\'s $x" >/dev/null', "arg with  spaces"]
    limits = ["--cpu-quota", "50", "--memory-max", "64M", "--io-max", f"{mm} rbps=1M wiops=100"]
    job = sandbox.spawn(
        ["ffrtmp", "run", "--job-id", "io", "--intent", "a test", *limits, "--", *command],
        env={"FFRTMP_STATE_DIR": str(state_dir)}, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert (
        ffrtmp("run", "--job-id", "fails", "--cpu-max", "max 50000", "--", "sh", "-c", "exit 3").returncode
        == 3
    )
    try:
        wait_for(lambda: "ffrtmp-io.scope" in scopes(sandbox), timeout=20, what="the scope")
        dev = json.loads(ffrtmp("ls", "--json").stdout)["running"][0]["limits"]["io_max"][0]["device"]
        running = ffrtmp("ls").stdout
        assert running.splitlines()[1].endswith(f"  cpu 50%, memory 64M, io-max {dev} rbps=1M wiops=100")
        outputs = [running, ffrtmp("ls", "--all").stdout]
    finally:
        job.communicate(b"go\n", timeout=30)
    assert job.returncode == 0
    outputs += [ffrtmp("ls", "--all").stdout, ffrtmp("show", "io").stdout, ffrtmp("show", "fails").stdout]
    shown = dict(ln.strip().split(": ", 1) for ln in outputs[-2].splitlines()[1:])
    assert shown["command"] == shlex.join(command) and shown["intent"] == "a test"
    assert shown["limits"] == f"cpu 50%, memory 64M, io-max {dev} rbps=1M wiops=100"
    assert "  limits: cpu-max max 50000\n" in outputs[-1] and "  exit_code: 3\n" in outputs[-1]
    assert [r for r in REPRS for out in outputs if r in out] == [], outputs


def test_all_names_a_bad_record_and_lists_the_others(ffrtmp: Ffrtmp, state_dir: Path) -> None:
    """issue 10: a FIFO named *.json once hung `ls --all` forever."""
    assert ffrtmp("run", "--job-id", "good", "--", "true").returncode == 0
    os.mkfifo(state_dir / "results" / "fifo.json")
    r = ffrtmp("ls", "--all")
    assert r.returncode == 0
    assert r.stderr == f"ffrtmp: skipped bad record {state_dir}/results/fifo.json: not a regular file\n"
    assert [ln.split()[0] for ln in r.stdout.split("\n\n")[1].splitlines()] == ["JOB", "good"]
