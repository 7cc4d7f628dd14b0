"""`ffrtmp run` without the CLI framework, to measure what typer costs. A benchmark aid ONLY, not a CLI.

    python bench/lean_run.py run [--job-id ID] -- CMD [ARGS...]

Does what `ffrtmp run` does with no limits (the same wrapper.run, logging set-up, summary line and
exit status), with the state directory from FFRTMP_STATE_DIR; anything else is refused.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ffrtmp_systemd.limits import parse_limits
from ffrtmp_systemd.names import job_id
from ffrtmp_systemd.presentation import summary_line
from ffrtmp_systemd.report.store import Store
from ffrtmp_systemd.wrapper.run import run


def main(argv: list[str]) -> int:
    job = None
    if argv[:1] != ["run"]:
        raise SystemExit("usage: lean_run.py run [--job-id ID] -- CMD [ARGS...]")
    argv = argv[1:]
    if argv[:1] == ["--job-id"]:
        job, argv = argv[1], argv[2:]
    if argv[:1] != ["--"] or len(argv) < 2:
        raise SystemExit("usage: lean_run.py run [--job-id ID] -- CMD [ARGS...]")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    store = Store(Path(os.environ.get("FFRTMP_STATE_DIR", "/var/lib/ffrtmp")))
    result, code = run(argv[1:], job_id(job), parse_limits(), None, store)
    if result is not None:
        print(summary_line(result), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
