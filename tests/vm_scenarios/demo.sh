#!/bin/bash
# scripts/demo.sh on a host whose PID 1 is systemd: its host branch, every frame received.
# Run from a scope, as from a login shell (session-N.scope): the runner is a service, and attach
# rightly refuses to move a service's process without --force.
systemd-run --quiet --scope --unit=demo-shell scripts/demo.sh > "$OUT/demo.out" 2> "$OUT/demo.err"
echo $? > "$OUT/demo.rc"
# Its scopes were the host's (the PID 1 systemd's journal knows them; a sandbox's would not).
journalctl -q --no-pager -o cat -u ffrtmp-demo-attach.scope -u ffrtmp-demo-run.scope > "$OUT/journal"
