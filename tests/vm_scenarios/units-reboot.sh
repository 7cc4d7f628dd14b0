#!/bin/bash
# After a reboot: the enabled socket and agent are up again, its counters are what they were, and a
# job goes through the agent.
set -u
. tests/vm_scenarios/lib.sh
[ -e /root/before-reboot.txt ] && scrape "$OUT/after-reboot.txt" && cp /root/before-reboot.txt "$OUT/"
systemctl is-active ffrtmp.socket ffrtmp-agent.service > "$OUT/active"
systemctl is-enabled ffrtmp.socket ffrtmp-agent.service > "$OUT/enabled"
/usr/local/bin/ffrtmp run --job-id rebooted -- true 2> "$OUT/job.err"
echo $? > "$OUT/job.rc"
exit 0
