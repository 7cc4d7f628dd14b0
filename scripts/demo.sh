#!/usr/bin/env bash
# The main job, demonstrated: a real systemd (the host's if it is PID 1, else a sandbox) shows a slice.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ "$(cat /proc/1/comm)" = systemd ]; then
  exec systemctl status --no-pager ffrtmp.slice
fi
exec .venv/bin/python tests/sandbox.py run -- systemctl status --no-pager ffrtmp.slice
