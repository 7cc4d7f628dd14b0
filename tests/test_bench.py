"""bench/run.py in its quick mode still runs end to end, in both modes, and writes its table. No timing
is asserted."""
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
# (figure, modes it is measured in): issue 11's table, in the installed mode and the fallback
FIGURES = [
    ("the agent after each of 2 batches of 8 jobs", ("agent",)),
    ("wall time of `ffrtmp run -- true`", ("agent", "fallback")),
    ("CPU time (user+sys)", ("agent", "fallback")),
    ("time from invocation to the workload's exec", ("agent", "fallback")),
    ("a waiting `ffrtmp run -- sleep 600`: private memory (USS)", ("agent", "fallback")),
    ("wakeups of that waiting client", ("agent", "fallback")),
    ("the agent with 5 live jobs", ("agent",)),
    ("attach, invocation of `ffrtmp attach` → adopted", ("agent", "fallback")),
    ("5 concurrent `ffrtmp run -- sleep 1`", ("agent", "fallback")),
    ("standalone `ffrtmp exporter`, `/metrics` with 200 result files", ("agent",)),
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
    assert "| figure | mode | ffrtmp | reference in the same run | target | holds | load |" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "failed:" not in ln]
    for figure, modes in FIGURES:
        for mode in modes:
            found = any(ln.startswith(f"| {figure}") and f" | {mode} | " in ln for ln in rows)
            assert found, f"no {mode} row for {figure!r}:\n{text}"
    for key in ("| CPU |", "| memory |", "| kernel |", "| systemd |", "| Python |"):
        assert key in text
    assert "## Notes" in text and "## Method" in text
    assert "`ffrtmp run -- true` costs" in text  # where the time goes, per mode
