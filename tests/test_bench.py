"""bench/run.py in its quick mode still runs end to end and writes its table. No timing is asserted."""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_sandbox

REPO = Path(__file__).resolve().parent.parent
FIGURES = [
    "wall time of `ffrtmp run -- true`",
    "CPU time (user+sys)",
    "time from invocation to the workload's exec",
    "resident cost of a waiting `ffrtmp run -- sleep 600` (PSS",
    "wakeups of a waiting wrapper",
    "attach, invocation of `ffrtmp attach` → scope `done`",
    "attach, StartTransientUnit call → JobRemoved `done`",
    "5 concurrent `ffrtmp run -- sleep 1`",
    "exporter `/metrics` with 200 result files",
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_benchmark_writes_the_table(tmp_path: Path) -> None:
    need_sandbox()
    out = tmp_path / "RESULTS.md"
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = out.read_text()
    assert "| figure | ffrtmp | reference in the same run | target | holds |" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "failed:" not in ln]
    for figure in FIGURES:
        assert any(ln.startswith(f"| {figure}") for ln in rows), f"no row for {figure!r}:\n{text}"
    for key in ("| CPU |", "| memory |", "| kernel |", "| systemd |", "| Python |"):
        assert key in text
    assert "## Where the time goes" in text and "## Method" in text
