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
# shell starts is adopted by the agent, its real exit status recorded; one adopted before a kill -9 of
# the agent is resumed by the restarted agent and frozen once.
install -d /etc/ffrtmp /etc/systemd/system/ffrtmp-agent.service.d
printf '[[rule]]\nname = "aw"\nexe = "dash"\nargv = "agent-watch$"\nmemory-max = "64M"\n' > /etc/ffrtmp/watch.toml
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
systemd-run --quiet --scope --unit=aw-2 sh -c 'read x < /root/aw2.fifo; exit 7' agent-watch & aw2=$!
upto 180 governed "$aw2"
old=$(agent); echo "$old" > "$OUT/aw.agent.before"
systemctl kill -s KILL ffrtmp-agent.service
restarted() { local p; p=$(agent); [ "$p" != 0 ] && [ "$p" != "$old" ] && active ffrtmp-agent.service; }
upto 120 restarted; agent > "$OUT/aw.agent.after"
governed "$aw2" && echo yes > "$OUT/aw2.still"
echo go > /root/aw2.fifo; wait "$aw2"
upto 120 sh -c "ls /var/lib/ffrtmp/results/aw-$aw2-*.json" > /dev/null 2>&1
sleep 2  # a second freeze would have its time too
ls /var/lib/ffrtmp/results/ | grep -c "^aw-$aw2-" > "$OUT/aw2.count"
ls /var/lib/ffrtmp/jobs/ | grep -c "^aw-$aw2-" > "$OUT/aw2.contracts"
cp /var/lib/ffrtmp/results/aw-"$aw2"-*.json "$OUT/aw2.json"
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
