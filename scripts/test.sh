#!/usr/bin/env bash
# The whole test suite, against real systemd sandboxes (needs root). Extra arguments go to pytest
# (e.g. -m "not slow" for the quick lane). Test files run in parallel, each file on one worker with
# its own sandboxes (pytest-xdist --dist loadfile); FFRTMP_TEST_WORKERS sets how many (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --tests
# Three runs. The sandbox suite twice: in-process (no agent: run and attach govern in their own
# process), then agent (ffrtmp.socket started in every sandbox, the installed mode; only the tests
# that use a sandbox); then the real-host VM (QEMU uses both cores: last, so that it never starves a
# sandbox). Each runs what "$@" selects of it; one with nothing selected (pytest's status 5, e.g.
# under -m "not slow" for the VM) is no failure. Each prints its wall time.
status=0
for run in "sandbox in-process" "sandbox agent" "vm in-process"; do
  read -r part mode <<< "$run"
  workers=("-n" "${FFRTMP_TEST_WORKERS:-4}" --dist loadfile)
  [ "$part" = vm ] && workers=()
  rc=0
  start=$SECONDS
  .venv/bin/pytest "${workers[@]}" --part "$part" --mode "$mode" "$@" || rc=$?
  [ "$rc" -eq 5 ] && rc=0
  echo "test.sh: --part $part --mode $mode: status $rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
