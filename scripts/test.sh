#!/usr/bin/env bash
# The whole test suite, against real systemd sandboxes (needs root). Extra arguments go to pytest
# (e.g. -m "not slow" for the quick lane). Test files run in parallel, each file on one worker with
# its own sandboxes (pytest-xdist --dist loadfile); FFRTMP_TEST_WORKERS sets how many (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/pytest -n "${FFRTMP_TEST_WORKERS:-4}" --dist loadfile "$@"
