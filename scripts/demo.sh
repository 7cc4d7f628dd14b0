#!/usr/bin/env bash
# The main job, demonstrated: `ffrtmp attach` on a live ffmpeg RTMP stream and `ffrtmp run` on a
# transcode, on the host's systemd if it is PID 1, otherwise in a private systemd sandbox with the
# agent installed and its socket started (the installed mode).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if [ "$(cat /proc/1/comm)" = systemd ]; then
  PATH="$PWD/.venv/bin:$PATH" exec scripts/demo-inner.sh
fi
exec .venv/bin/python tests/sandbox.py run --agent -- bash scripts/demo-inner.sh  # installed mode
