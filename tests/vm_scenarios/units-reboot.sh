#!/bin/bash
# After a reboot: the enabled exporter is up again and its counters are what they were.
set -u
. tests/vm_scenarios/lib.sh
scrape "$OUT/after-reboot.txt"
systemctl is-active ffrtmp-exporter.service > "$OUT/active"
systemctl is-enabled ffrtmp-exporter.service > "$OUT/enabled"
cp /root/before-reboot.txt "$OUT/before-reboot.txt"
