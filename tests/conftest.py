"""Shared fixtures: real systemd sandboxes, skipped with a reason where they cannot boot."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sandbox import Sandbox, why_unavailable

IN_CI = os.environ.get("CI") == "true"


def need_sandbox() -> None:
    """Skip (or, under CI=true, fail) when this machine cannot boot a sandbox."""
    reason = why_unavailable()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but the systemd sandbox cannot boot: {reason}")
    pytest.skip(f"systemd sandbox unavailable: {reason}")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """One sandbox shared by a test module."""
    need_sandbox()
    with Sandbox() as sb:
        yield sb


@pytest.fixture
def fresh_sandbox() -> Iterator[Sandbox]:
    """A sandbox of its own, for a test that breaks it."""
    need_sandbox()
    with Sandbox() as sb:
        yield sb


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d
