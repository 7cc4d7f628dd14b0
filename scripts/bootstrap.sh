#!/usr/bin/env bash
# Installs what the demo needs, only when missing: Debian packages and ./.venv. With --tests, also
# what only the tests need (tmux, prometheus; qemu, mmdebstrap, e2fsprogs for tests/vm.py).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
tools="ffmpeg:ffmpeg ffprobe:ffmpeg dbus-daemon:dbus busctl:systemd nsenter:util-linux"
if [ "${1:-}" = --tests ]; then
  tools="$tools tmux:tmux prometheus:prometheus promtool:prometheus qemu-system-x86_64:qemu-system-x86
         qemu-img:qemu-utils mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs e2fsck:e2fsprogs debugfs:e2fsprogs"
fi
for pair in $tools; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ -x /lib/systemd/systemd ] || need+=(systemd)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "bootstrap: creating .venv" >&2
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
