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
metrics "$OUT/after-restart.txt" && cp "$OUT/after-restart.txt" /root/before-reboot.txt
exit 0  # the scrapes above may be skipped: the tests judge the files
