"""`--user` where no user manager answers (the sandbox has none): the workload runs ungoverned and the
record, in the user's state directory, says why. A real user manager is in tests/test_vm_ops.py."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sandbox import Sandbox


def _user(sandbox: Sandbox, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_STATE_HOME": ""}
    return sandbox.run(["ffrtmp", "--user", *args], env={**base, **env}, timeout=60)


@pytest.mark.parametrize("state_home", ["", "relative/ignored", "ABS"])
def test_user_state_dir_is_xdg_state_home_and_no_user_bus_means_ungoverned(
    sandbox: Sandbox, tmp_path: Path, state_home: str
) -> None:
    (tmp_path / "run").mkdir()
    if state_home == "ABS":
        state_home = str(tmp_path / "state")
    r = _user(
        sandbox, tmp_path, "run", "--job-id", "u", "--", "sh", "-c", "exit 4", XDG_STATE_HOME=state_home
    )
    assert r.returncode == 4  # the workload ran, and its status is the answer
    where = Path(state_home) if state_home.startswith("/") else tmp_path / "home" / ".local" / "state"
    rec = json.loads((where / "ffrtmp" / "results" / "u.json").read_text())
    bus = f"unix:path={tmp_path / 'run' / 'bus'}"
    assert rec["governed"] is False and rec["platform_sla_reason"] == "governance_unavailable"
    assert rec["governance_error"].startswith(f"cannot reach the user bus ({bus})")
    assert "runs UNGOVERNED" in r.stderr.splitlines()[0]
    shown = _user(sandbox, tmp_path, "show", "u", XDG_STATE_HOME=state_home)
    assert shown.returncode == 0 and shown.stdout.startswith("JOB u | mode=run")


def test_user_bus_address_and_state_dir_can_be_given(sandbox: Sandbox, tmp_path: Path) -> None:
    given = tmp_path / "given"
    r = _user(
        sandbox, tmp_path, "run", "--job-id", "g", "--", "true",
        DBUS_SESSION_BUS_ADDRESS=f"unix:path={tmp_path}/elsewhere", FFRTMP_STATE_DIR=str(given),
    )  # fmt: skip
    assert r.returncode == 0
    rec = json.loads((given / "results" / "g.json").read_text())
    assert rec["governance_error"].startswith(f"cannot reach the user bus (unix:path={tmp_path}/elsewhere)")
    assert not (tmp_path / "home").exists()


def test_user_run_keeps_runs_usage_status(sandbox: Sandbox, tmp_path: Path) -> None:
    r = _user(sandbox, tmp_path, "run", "--cpu-quota", "x", "--", "true")
    assert r.returncode == 125 and r.stderr.startswith("ffrtmp: ")
    assert not (tmp_path / "home").exists()
