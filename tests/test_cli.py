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

from ffrtmp_systemd import __version__

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
    assert "  limits: cpu-quota 200%, memory 512M\n" in r.stdout  # as written, not a dict
    assert "  command: ffmpeg -i in.mp4 out.mp4\n" in r.stdout and "  governed: yes\n" in r.stdout
    assert "  origin: -\n" in r.stdout
    assert (
        "  start_time: 2026-11-30 12:00:00 UTC\n" in r.stdout and "  processing_seconds: 1m30s\n" in r.stdout
    )
    r = cli("show", "missing", state=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("ffrtmp: no result for job 'missing'")


def test_version() -> None:
    r = cli("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"ffrtmp {__version__}\n", "")


def test_no_arguments_print_the_help_and_nothing_else() -> None:
    r = cli()
    assert r.returncode == 2 and "Usage:" in r.stdout and r.stderr == ""


def test_bash_completes_subcommands_and_options(tmp_path: Path) -> None:
    """The script `ffrtmp --show-completion` prints in bash, sourced by a real bash, asked as TAB asks."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    show = subprocess.run(  # `; true`: bash stays ffrtmp's parent, the shell it detects
        ["bash", "-c", "ffrtmp --show-completion; true"], capture_output=True, text=True, timeout=30, env=env
    )
    assert show.returncode == 0 and "complete -o default -F _ffrtmp_completion ffrtmp" in show.stdout, show
    (tmp_path / "ffrtmp.bash").write_text(show.stdout)

    def tab(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        script = (
            f"source {tmp_path / 'ffrtmp.bash'}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1};"
            ' _ffrtmp_completion ffrtmp; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    commands = ["run", "attach", "release", "show", "exporter", "agent", "reconcile", "ls", "watch"]
    assert tab("ffrtmp", "") == commands
    assert tab("ffrtmp", "re") == ["release", "reconcile"]
    assert {"--all", "--last", "--json", "--state-dir"} <= set(tab("ffrtmp", "ls", "--"))


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


FORGED = "x\nJOB forged | mode=run | intent=- | sla=COMPLIANT"


@pytest.mark.parametrize(("args", "status"), [
    (["run", "--intent", FORGED, "--", "true"], 125),
    (["run", "--intent", "a | sla=COMPLIANT", "--", "true"], 125),
    (["run", "--intent", "caf\udce9", "--", "true"], 125),
    (["attach", "--pid", "12", "--intent", "a\rb"], 2),
])  # fmt: skip
def test_an_intent_that_could_forge_a_line_is_refused(args: list[str], status: int, tmp_path: Path) -> None:
    r = cli(*args, state=tmp_path)
    assert r.returncode == status and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("ffrtmp: invalid --intent ") and list(tmp_path.iterdir()) == []


def test_show_never_prints_a_forged_line(tmp_path: Path) -> None:
    """A record written by hand (or by an older version) with a newline and '|' in its intent and command."""
    record = json.loads((Path(__file__).parent / "golden" / "result.json").read_text())
    record.update(intent=FORGED, command=["ls", "caf\udce9\nJOB forged"])
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{record['job_id']}.json").write_text(json.dumps(record))
    r = cli("show", record["job_id"], state=tmp_path)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and [ln for ln in lines if ln.startswith("JOB")] == [lines[0]]
    assert lines[0].count(" | ") == 8 and "intent=x\\nJOB forged \\x7c mode=run" in lines[0]
    assert all(ln.startswith("  ") for ln in lines[1:]) and "  intent: x\\nJOB forged | mode=run" in r.stdout
