#!/usr/bin/env bash
# The whole test suite, against real systemd sandboxes (needs root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --tests
exec .venv/bin/pytest "$@"
