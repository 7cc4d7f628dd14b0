#!/bin/bash
# Process events and `ffrtmp watch` on a real host (init PID namespace, systemd PID 1): exec and exit
# events with their codes, launchers unrelated to ffrtmp (a shell, a named and an unnamed .service).
set -u
. tests/vm_scenarios/lib.sh
export FFRTMP_STATE_DIR=/var/lib/ffrtmp-watch
PY=.venv/bin/python

# 1. the event source alone: every event of the host, printed
$PY - > "$OUT/events" 2> "$OUT/events.err" <<'EOF' &
import select
from ffrtmp_systemd.procevents import ProcEvents
pe = ProcEvents()
print("ready", flush=True)
while True:
    select.select([pe], [], [])
    for e in pe.read():
        print(e, flush=True)
EOF
listener=$!
upto 120 grep -q ready "$OUT/events"
sh -c 'exit 7' & p7=$!; wait $p7
sleep 100 & pt=$!; kill -TERM $pt; wait $pt
systemd-run --quiet --unit=pe-svc -p RemainAfterExit=yes sh -c 'exit 7'
upto 60 test "$(systemctl show -p ExecMainCode --value pe-svc)" = 1
ps=$(systemctl show -p ExecMainPID --value pe-svc)
echo "$p7 $pt $ps" > "$OUT/pe.pids"
upto 60 grep -q "Exit(pid=$ps," "$OUT/events"
kill $listener

# 2. ffrtmp watch in the foreground
cat > /root/watch.toml <<'EOF'
[[rule]]
name = "shell"
exe = "sleep"
argv = "^301$"
cpu-quota = 50
memory-max = "64M"
intent = "test"

[[rule]]
name = "svc"
exe = "sleep"
argv = "^30[23]$"
unit = "watch-named.service"
memory-max = "32M"

[[rule]]
name = "any"
exe = "sleep"
argv = "^30[23]$"
EOF
ffrtmp watch --check --config /root/watch.toml > "$OUT/check.out" 2>&1; echo $? > "$OUT/check.rc"
sleep 301 & before=$!   # running before watch starts: the /proc pass
ffrtmp watch --config /root/watch.toml 2> "$OUT/watch.err" & watch=$!
upto 180 grep -q "listening to process events" "$OUT/watch.err"
sleep 301 & shell=$!
sleep 304 & other=$!
systemd-run --quiet --unit=watch-named sleep 302
systemd-run --quiet --unit=watch-other sleep 303
named=$(systemctl show -p MainPID --value watch-named); unnamed=$(systemctl show -p MainPID --value watch-other)
echo "$before $shell $other $named $unnamed" > "$OUT/watch.pids"
governed() { grep -q ffrtmp- "/proc/$1/cgroup"; }
upto 300 governed "$before"; upto 300 governed "$shell"; upto 300 governed "$named"
sleep 5  # the attach of a job that would wrongly be made has its time too
for p in $before $shell $other $named $unnamed; do
  echo "$p $(grep -o '[^/]*$' /proc/$p/cgroup | tail -1)"
done > "$OUT/units"
for j in $(systemctl list-units --plain --no-legend 'ffrtmp-*' | awk '{print $1}'); do
  c=$(cg "$j"); echo "$j $(cat $c/cpu.max 2>/dev/null | tr ' ' _) $(cat $c/memory.max)"
done > "$OUT/scopes"
kill -TERM "$shell"; kill -KILL "$named"
upto 120 test -e "$FFRTMP_STATE_DIR/results/shell-$shell-"*.json
kill -INT "$watch"; wait "$watch"; echo $? > "$OUT/watch.rc"
upto 120 test -e "$FFRTMP_STATE_DIR/results/svc-$named-"*.json
cp -r "$FFRTMP_STATE_DIR/results" "$OUT/"
kill "$before" "$other" 2>/dev/null
systemctl stop watch-other
true
