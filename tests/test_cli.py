"""The command line: help, one-line usage errors with the documented statuses, show."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FFRTMP = [sys.executable, "-m", "ffrtmp_systemd"]


def cli(*args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "FFRTMP_STATE_DIR": str(state or "/nonexistent-ffrtmp-state")}
    return subprocess.run([*FFRTMP, *args], capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.parametrize("command", ["run", "attach", "release", "show"])
def test_every_command_has_help(command: str) -> None:
    r = cli(command, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout and "--state-dir" in r.stdout


@pytest.mark.parametrize(("args", "status", "text"), [
    (["run", "--cpu-max", "1 2", "--cpu-quota", "5", "--", "true"], 125, "--cpu-max and --cpu-quota"),
    (["run", "--bogus", "--", "true"], 125, "--bogus"),
    (["run"], 125, "Missing argument 'command'"),
    (["run", "--job-id", "../x", "--", "true"], 125, "invalid job id '../x'"),
    (["attach", "--pid", "12", "--memory-max", "12Q"], 2, "--memory-max"),
    (["attach"], 2, "--pid"),
    (["attach", "--pid", "abc"], 2, "Invalid value for '--pid'"),
    (["show", "a/b"], 2, "invalid job id 'a/b'"),
    (["release", "-x"], 2, "-x"),
])  # fmt: skip
def test_usage_errors_are_one_line(args: list[str], status: int, text: str, tmp_path: Path) -> None:
    r = cli(*args, state=tmp_path)
    assert r.returncode == status, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and text in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_show_prints_a_frozen_result(tmp_path: Path) -> None:
    golden = Path(__file__).parent / "golden" / "result.json"
    record = json.loads(golden.read_text())
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{record['job_id']}.json").write_text(golden.read_text())
    r = cli("show", record["job_id"], "--json", state=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout) == record
    r = cli("show", record["job_id"], state=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"JOB {record['job_id']} | mode=")
    assert f"  platform_sla_reason: {record['platform_sla_reason']}" in r.stdout
    r = cli("show", "missing", state=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("ffrtmp: no result for job 'missing'")


def test_show_never_blocks_on_a_fifo_nor_follows_a_link(tmp_path: Path) -> None:
    """A FIFO named *.json once hung `show` forever (the subprocess's timeout fails it instead)."""
    (tmp_path / "results").mkdir()
    os.mkfifo(tmp_path / "results" / "fifo.json")
    (tmp_path / "results" / "link.json").symlink_to("/etc/hostname")
    for job, why in (("fifo", "not a regular file"), ("link", "a symbolic link")):
        r = cli("show", job, state=tmp_path)
        assert (r.returncode, r.stderr) == (1, f"ffrtmp: bad record {tmp_path}/results/{job}.json: {why}\n")


def test_a_relative_state_dir_is_made_absolute_once(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    args = [*FFRTMP, "show", "nope", "--state-dir", "rel"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, f"ffrtmp: no result for job 'nope' in {tmp_path}/rel/results\n")
