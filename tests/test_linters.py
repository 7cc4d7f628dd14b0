"""Linters are tests: ruff (lint and format) and mypy --strict over the package."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "ffrtmp_systemd", "tests", "bench"],
        ["ruff", "format", "--check", "ffrtmp_systemd", "tests", "bench"],
        ["mypy", "ffrtmp_systemd", "bench"],
    ],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_linter(cmd: list[str]) -> None:
    r = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


GOLDEN = [
    "# If the wrapper crashes, the workload MUST continue.",
    "# If we are unsure, DO LESS.",
    "# If something is not reversible, DO NOT TOUCH IT.",
    "# This is governance, not execution.",
]


def test_golden_rules_head_every_module() -> None:
    missing = [
        str(p)
        for p in sorted((REPO / "ffrtmp_systemd").rglob("*.py"))
        if p.stat().st_size and "\n".join(GOLDEN) not in "\n".join(p.read_text().splitlines()[:15])
    ]
    assert missing == []


def test_only_one_module_imports_dbus_next() -> None:
    users = {
        str(p.relative_to(REPO))
        for p in (REPO / "ffrtmp_systemd").rglob("*.py")
        if "dbus_next" in p.read_text()
    }
    assert users <= {"ffrtmp_systemd/systemd/bus.py"}
