#!/bin/bash
# Process events and `ffrtmp watch` on a real host (init PID namespace, systemd PID 1): exec and exit
# events with their codes; launchers unrelated to ffrtmp (a shell, a named and an unnamed .service).
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
sh -c 'kill -TERM $$' & pt=$!; wait $pt
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
argv = "^3001$"
cpu-quota = 50
memory-max = "64M"
intent = "test"

[[rule]]
name = "svc"
exe = "sleep"
argv = "^300[23]$"
unit = "watch-named.service"
memory-max = "32M"

[[rule]]
name = "any"
exe = "sleep"
argv = "^300[23]$"

[[rule]]
name = "seven"
exe = "dash"
argv = "watch-seven$"

[[rule]]
name = "many"
exe = "sleep"
argv = "^3005$"
cpu-weight = 50

[[rule]]
name = "fifty"
exe = "sleep"
argv = "^3006$"
EOF
ffrtmp watch --check --config /root/watch.toml > "$OUT/check.out" 2>&1; echo $? > "$OUT/check.rc"
mkfifo /root/seven.fifo
# This script runs in a .service (the VM's runner): what it starts directly a rule without `unit` never
# matches. The "shell" processes are started in scopes, as a login shell's are (session-N.scope).
SCOPE="systemd-run --quiet --scope --unit"  # not a function: $! is then the command's PID (it execs)
$SCOPE=w-before sleep 3001 & before=$!   # running before watch starts: the /proc pass
upto 60 sh -c "readlink /proc/$before/exe | grep -q sleep"
ffrtmp watch --config /root/watch.toml 2> "$OUT/watch.err" & watch=$!
upto 180 grep -q "listening to process events" "$OUT/watch.err"
$SCOPE=w-shell sleep 3001 & shell=$!
$SCOPE=w-other sleep 3004 & other=$!
$SCOPE=w-seven sh -c 'read x < /root/seven.fifo; exit 7' watch-seven & seven=$!
many=""; for i in 1 2 3 4 5 6 7 8 9 10; do $SCOPE="w-many-$i" sleep 3005 & many="$many $!"; done
systemd-run --quiet --unit=watch-named sleep 3002
systemd-run --quiet --unit=watch-other sleep 3003
named=$(systemctl show -p MainPID --value watch-named); unnamed=$(systemctl show -p MainPID --value watch-other)
echo "$before $shell $other $named $unnamed $seven" > "$OUT/watch.pids"
echo $many > "$OUT/many.pids"
governed() { grep -q ffrtmp.slice/ "/proc/$1/cgroup"; }
for p in $before $shell $named $seven $many; do upto 120 governed "$p"; done
sleep 5  # the adoption of a process wrongly matched has its time too
for p in $before $shell $other $named $unnamed $seven $many; do
  echo "$p $(grep -o '[^/]*$' /proc/$p/cgroup | tail -1)"
done > "$OUT/units"
v() { local x; x=$(cat "$1" 2>/dev/null | tr ' ' _); echo "${x:--}"; }
for j in $(systemctl list-units --plain --no-legend 'ffrtmp-*.scope' | awk '{print $1}'); do
  c=$(cg "$j"); echo "$j $(v "$c/cpu.max") $(v "$c/memory.max") $(v "$c/cpu.weight")"
done > "$OUT/scopes"
# 50 matching processes started at once (by one shell in one scope): each adopted, exactly once
$SCOPE=w-fifty sh -c 'for i in $(seq 50); do sleep 3006 & done; wait' & fifty=$!
count() { systemctl list-units --plain --no-legend "ffrtmp-$1-*.scope" | wc -l; }
upto 600 test "$(count fifty)" -ge 50
sleep 5  # a second adoption of one of them would have its time too
count fifty > "$OUT/fifty.scopes"
pgrep -P "$fifty" > "$OUT/fifty.pids"
grep -c "rule fifty matched" "$OUT/watch.err" > "$OUT/fifty.matched"
kill $(cat "$OUT/fifty.pids") "$fifty"
echo go > /root/seven.fifo
kill -TERM "$shell"; kill -KILL "$named"
done_() { ls "$FFRTMP_STATE_DIR"/results/$1-$2-*.json > /dev/null 2>&1; }
upto 120 done_ shell "$shell"; upto 120 done_ svc "$named"; upto 120 done_ seven "$seven"
kill -INT "$watch"; wait "$watch"; echo $? > "$OUT/watch.rc"
kill -0 "$before" && grep -o '[^/]*$' /proc/$before/cgroup | tail -1 > "$OUT/before.after"
cp -r "$FFRTMP_STATE_DIR/results" "$OUT/"
kill "$before" "$other" $many 2>/dev/null
systemctl stop watch-other

# 3. a live RTMP receiver started in a shell's scope, fed in real time: adopted by its exec event while
#    it listens, every frame received; its sender (no -listen) untouched
cat > /root/rtmp.toml <<'EOF'
[[rule]]
name = "rtmp"
exe = "ffmpeg"
argv = "-listen 1 .*rtmp://"
cpu-quota = 50
memory-max = "256M"
EOF
ffrtmp watch --config /root/rtmp.toml 2> "$OUT/rtmp-watch.err" & rwatch=$!
upto 180 grep -q "listening to process events" "$OUT/rtmp-watch.err"
url=rtmp://127.0.0.1:19351/live/s
$SCOPE=w-receiver ffmpeg -nostdin -loglevel error -listen 1 -i "$url" -c copy -f flv /root/w-received.flv \
  2> "$OUT/receiver.err" & receiver=$!
listening() { ss -Hltn 'sport = :19351' | grep -q .; }
upto 120 listening
upto 120 governed "$receiver"
$SCOPE=w-sender ffmpeg -nostdin -loglevel error -re -f lavfi -i testsrc2=size=160x120:rate=10 -t 20 \
  -c:v libx264 -preset ultrafast -tune zerolatency -g 10 -f flv "$url" 2> "$OUT/sender.err" & sender=$!
upto 60 sh -c "readlink /proc/$sender/exe | grep -q ffmpeg"
grep -o '[^/]*$' "/proc/$receiver/cgroup" | tail -1 > "$OUT/receiver.unit"
grep -o '[^/]*$' "/proc/$sender/cgroup" | tail -1 > "$OUT/sender.unit"
c=$(cg "$(cat "$OUT/receiver.unit")"); cat "$c/cpu.max" "$c/memory.max" > "$OUT/receiver.limits"
wait "$sender"; echo $? > "$OUT/sender.rc"
wait "$receiver"; echo $? > "$OUT/receiver.rc"
echo "$receiver" > "$OUT/receiver.pid"
upto 120 done_ rtmp "$receiver"
kill -INT "$rwatch"; wait "$rwatch"
ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames -of csv=p=0 \
  /root/w-received.flv > "$OUT/frames"
cp "$FFRTMP_STATE_DIR"/results/rtmp-"$receiver"-*.json "$OUT/rtmp.json"
true
