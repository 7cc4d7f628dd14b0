#!/usr/bin/env bash
# The whole test suite, against real systemd sandboxes (needs root). Extra arguments go to pytest
# (e.g. -m "not slow" for the quick lane). Test files run in parallel, each file on one worker with
# its own sandboxes (pytest-xdist --dist loadfile); FFRTMP_TEST_WORKERS sets how many (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --tests
# Part 1, the sandbox suite; part 2, the real-host VM (QEMU uses both cores: after part 1, so that it
# never starves a sandbox). Each part runs what "$@" selects of it; a part with nothing selected
# (pytest's status 5, e.g. under -m "not slow" for the VM) is no failure.
status=0
for part in sandbox vm; do
  workers=("-n" "${FFRTMP_TEST_WORKERS:-4}" --dist loadfile)
  [ "$part" = vm ] && workers=()
  rc=0
  .venv/bin/pytest "${workers[@]}" --part "$part" "$@" || rc=$?
  [ "$rc" -eq 5 ] && rc=0
  [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
