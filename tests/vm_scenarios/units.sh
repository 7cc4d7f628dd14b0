#!/bin/bash
# The README's "Installing the units" steps as written (pip from the brought-in wheels), then jobs
# through the agent (the installed mode), one in-process, a scrape, a restart of the agent, a scrape;
# the scrape is kept on the root disk for the reboot.
set -u
. tests/vm_scenarios/lib.sh
sed -n '/^\*\*Installing the units\*\*/,/^```$/p' README.md | sed -n '/^```sh$/,/^```$/{//!p}' > "$OUT/steps.sh"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  bash -ex "$OUT/steps.sh" > "$OUT/steps.out" 2> "$OUT/steps.err"
echo $? > "$OUT/steps.rc"
systemctl show -p ExecStart --value ffrtmp-agent.service > "$OUT/execstart"
# The scrapes only where the steps' own curl got /metrics (Type=notify: at once), not 180 s each in vain.
metrics() { [ "$(cat "$OUT/steps.rc")" = 0 ] && scrape "$@"; }
ff=/usr/local/bin/ffrtmp
agent() { systemctl show -p MainPID --value ffrtmp-agent.service; }
$ff run --job-id ok -- true 2>> "$OUT/jobs.err"
$ff run --job-id fails -- sh -c 'exit 3' 2>> "$OUT/jobs.err"
# In-process on request; the agent's exporter counts it all the same (same state directory).
FFRTMP_AGENT_SOCKET=none DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent $ff run --job-id ungoverned -- true \
  2>> "$OUT/jobs.err"
# While a job runs, the agent holds /dev/kmsg open (its OOM fallback on cgroup v2): DeviceAllow and
# CAP_SYSLOG (kernel.dmesg_restrict=1 on Debian) let it. Then an OOM kill through the agent.
rm -f /root/k.fifo; mkfifo /root/k.fifo
$ff run --job-id kmsg -- sh -c 'read x < /root/k.fifo' 2>> "$OUT/jobs.err" &
upto 120 active ffrtmp-kmsg.scope
ls -l "/proc/$(agent)/fd" | grep -c ' -> /dev/kmsg$' > "$OUT/kmsg"
echo go > /root/k.fifo; wait
$ff run --job-id khog --memory-max 40M -- python3 -c "b = bytearray(300 << 20)" 2>> "$OUT/jobs.err"
echo $? > "$OUT/khog.rc"
cp /var/lib/ffrtmp/results/khog.json "$OUT/khog.json"
sysctl -n kernel.dmesg_restrict > "$OUT/dmesg_restrict"
grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' "/proc/$(agent)/status" > "$OUT/agent.status"
systemctl status --no-pager ffrtmp-agent.service > "$OUT/status.txt"
metrics "$OUT/before.txt"
[ "$(cat "$OUT/steps.rc")" = 0 ] && curl -sf -o "$OUT/violations.json" http://127.0.0.1:9464/violations
agent > "$OUT/pid.before"
systemctl restart ffrtmp-agent.service
agent > "$OUT/pid.restarted"
metrics "$OUT/restarted.txt"
$ff run --job-id after-restart -- true 2>> "$OUT/jobs.err"
metrics "$OUT/after-restart.txt"
# Watch rules in the installed agent (README "watch"): a drop-in and a restart. A process an unrelated
# shell starts is adopted by the agent, its real exit status recorded; one OOM-killed; those adopted
# before a kill -9 of the agent (live RTMP streams among them) are resumed by the restarted agent and
# frozen once.
install -d /etc/ffrtmp /etc/systemd/system/ffrtmp-agent.service.d
cat > /etc/ffrtmp/watch.toml <<'EOF'
[[rule]]
name = "aw"
exe = "dash"
argv = "agent-watch$"
memory-max = "64M"

[[rule]]
name = "aoom"
exe = "dash"
argv = "agent-oom$"
memory-max = "40M"

[[rule]]
name = "live"
exe = "ffmpeg"
argv = "-listen 1 -i rtmp://127[.]0[.]0[.]1:1935[23]/"
cpu-quota = 50
memory-max = "256M"
EOF
printf '[Service]\nEnvironment=FFRTMP_WATCH_RULES=/etc/ffrtmp/watch.toml\n' \
  > /etc/systemd/system/ffrtmp-agent.service.d/watch.conf
systemctl daemon-reload
systemctl restart ffrtmp-agent.service
rm -f /root/aw1.fifo /root/aw2.fifo; mkfifo /root/aw1.fifo /root/aw2.fifo
governed() { grep -q ffrtmp.slice/ "/proc/$1/cgroup"; }  # not the runner's ffrtmp-vm-runner.service
systemd-run --quiet --scope --unit=aw-1 sh -c 'read x < /root/aw1.fifo; exit 7' agent-watch & aw1=$!
upto 180 governed "$aw1"
cat "/proc/$aw1/cgroup" > "$OUT/aw1.cgroup"
grep -o '[^/]*$' "/proc/$aw1/cgroup" | tail -1 > "$OUT/aw1.unit"
upto 60 active "$(cat "$OUT/aw1.unit")"
cat "$(cg "$(cat "$OUT/aw1.unit")")/memory.max" > "$OUT/aw1.memory" 2> "$OUT/aw1.memory.err"
echo go > /root/aw1.fifo; wait "$aw1"; echo $? > "$OUT/aw1.rc"
upto 120 sh -c "ls /var/lib/ffrtmp/results/aw-$aw1-*.json" > /dev/null 2>&1
cp /var/lib/ffrtmp/results/aw-"$aw1"-*.json "$OUT/aw1.json"
frozen() { ls /var/lib/ffrtmp/results/$1.json > /dev/null 2>&1; }  # JOB, or a glob (watch jobs)
mark() { echo "$1 $(date +%s.%N)" >> "$OUT/marks"; }  # how long each step took
mark oom
# An adopted process OOM-killed: the rule's memory-max, then it allocates past it (exec: the same PID).
rm -f /root/aoom.fifo; mkfifo /root/aoom.fifo
systemd-run --quiet --scope --unit=aoom-1 \
  sh -c 'read x < /root/aoom.fifo; exec python3 -c "b = bytearray(300 << 20)"' agent-oom & aoom=$!
upto 180 governed "$aoom"
echo go > /root/aoom.fifo; wait "$aoom"; echo $? > "$OUT/aoom.rc"
upto 120 frozen "aoom-$aoom-*"
j=$(basename /var/lib/ffrtmp/results/aoom-"$aoom"-*.json .json)
cp "/var/lib/ffrtmp/results/$j.json" "$OUT/aoom.json"; $ff show "$j" > "$OUT/aoom.show" 2>&1
mark kill9
# One kill -9 of the agent while it governs: a watch job (aw-2), a run job whose client was killed -9
# before (rr), and two live RTMP receivers a rule adopted, fed in real time (the kill is mid-stream).
systemd-run --quiet --scope --unit=aw-2 sh -c 'read x < /root/aw2.fifo; exit 7' agent-watch & aw2=$!
rm -f /root/rr.fifo; mkfifo /root/rr.fifo
$ff run --job-id rr -- sh -c 'read x < /root/rr.fifo; exit 5' 2> "$OUT/rr.err" & rr=$!; echo "$rr" > "$OUT/rr.pid"
live="" senders=""
for n in 2 3; do
  rm -f "/root/live$n.flv"
  systemd-run --quiet --scope --unit="live-$n" ffmpeg -nostdin -loglevel error -listen 1 \
    -i "rtmp://127.0.0.1:1935$n/live/s" -c copy -f flv "/root/live$n.flv" 2> "$OUT/live$n.err" &
  live="$live $!"
done
echo $live > "$OUT/live.pids"
listening() { ss -Hltn "sport = :$1" | grep -q .; }
upto 180 governed "$aw2"; upto 120 active ffrtmp-rr.scope
for p in $live; do upto 180 governed "$p"; done
upto 120 listening 19352; upto 120 listening 19353
kill -KILL "$rr"; wait "$rr" 2> /dev/null  # the run job's client: its workload and scope go on
for n in 2 3; do
  ffmpeg -nostdin -loglevel error -re -f lavfi -i testsrc2=size=160x120:rate=10 -t 60 -c:v libx264 \
    -preset ultrafast -tune zerolatency -g 10 -f flv "rtmp://127.0.0.1:1935$n/live/s" 2> "$OUT/send$n.err" &
  senders="$senders $!"
done
upto 120 test -s /root/live2.flv; upto 120 test -s /root/live3.flv  # flowing
old=$(agent); echo "$old" > "$OUT/aw.agent.before"
t0=$SECONDS; kill -KILL "$old"
restarted() { local p; p=$(agent); [ "$p" != 0 ] && [ "$p" != "$old" ] && active ffrtmp-agent.service; }
upto 120 restarted; agent > "$OUT/aw.agent.after"; echo $((SECONDS - t0)) > "$OUT/restart.seconds"
for p in $live; do kill -0 "$p" && echo "$p alive"; done > "$OUT/live.after-restart"  # still mid-stream
governed "$aw2" && echo yes > "$OUT/aw2.still"
for p in $live; do
  u=$(grep -o '[^/]*$' "/proc/$p/cgroup" | tail -1); c=$(cg "$u")
  echo "$p $u $(tr ' ' _ < "$c/cpu.max") $(cat "$c/memory.max")"
done > "$OUT/live.scopes"  # after the restart: still in their scopes, with the rule's limits
echo go > /root/aw2.fifo; wait "$aw2"
echo go > /root/rr.fifo
for p in $senders; do wait "$p"; echo $?; done > "$OUT/senders.rc"
for p in $live; do wait "$p"; echo $?; done > "$OUT/live.rc"
upto 120 frozen "aw-$aw2-*"; upto 120 frozen rr
for p in $live; do upto 120 frozen "live-$p-*"; done
sleep 2  # a second freeze would have its time too
ls /var/lib/ffrtmp/results/ | grep -c "^aw-$aw2-" > "$OUT/aw2.count"
ls /var/lib/ffrtmp/jobs/ | grep -c "^aw-$aw2-" > "$OUT/aw2.contracts"
cp /var/lib/ffrtmp/results/aw-"$aw2"-*.json "$OUT/aw2.json"
cp /var/lib/ffrtmp/results/rr.json "$OUT/rr.json"
for n in 2 3; do
  ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames -of csv=p=0 \
    "/root/live$n.flv"
done > "$OUT/live.frames"
for p in $live; do  # PID, its results, its contracts left; its record; its summary as `show` says it
  echo "$p $(ls /var/lib/ffrtmp/results/ | grep -c "^live-$p-") $(ls /var/lib/ffrtmp/jobs/ | grep -c "^live-$p-")"
  cp /var/lib/ffrtmp/results/live-"$p"-*.json "$OUT/live-$p.json"
  $ff show "$(basename /var/lib/ffrtmp/results/live-"$p"-*.json .json)" | head -1 > "$OUT/live-$p.summary"
done > "$OUT/live.counts"
mark end
systemctl status --no-pager ffrtmp-agent.service > "$OUT/aw.status" 2>&1
journalctl -b -u ffrtmp-agent.service --no-pager -o cat > "$OUT/aw.journal" 2>&1
# A plain attach through the agent while it has process events (it runs watch rules; no rule matches
# this one): its record has the real exit status too.
rm -f /root/at.fifo; mkfifo /root/at.fifo
systemd-run --quiet --scope --unit=at-1 sh -c 'read x < /root/at.fifo; exit 7' plain-attach & at=$!
upto 120 active at-1.scope
$ff attach --pid "$at" --job-id plain-at 2> "$OUT/at.err" & atw=$!
upto 120 active ffrtmp-plain-at.scope
echo go > /root/at.fifo; wait "$at"; echo $? > "$OUT/at.workload.rc"
wait "$atw"; echo $? > "$OUT/at.rc"
cp /var/lib/ffrtmp/results/plain-at.json "$OUT/at.json"
metrics /root/before-reboot.txt  # every job of this boot counted: the reboot keeps these counters
exit 0  # the scrapes above may be skipped: the tests judge the files
