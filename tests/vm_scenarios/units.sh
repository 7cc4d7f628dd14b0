#!/bin/bash
# The README's "Installing the units" steps as written (pip from the brought-in wheels), then jobs,
# a scrape, a restart of the exporter, a scrape; the scrape is kept on the root disk for the reboot.
set -u
. tests/vm_scenarios/lib.sh
sed -n '/^\*\*Installing the units\*\*/,/^```$/p' README.md | sed -n '/^```sh$/,/^```$/{//!p}' > "$OUT/steps.sh"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  bash -ex "$OUT/steps.sh" > "$OUT/steps.out" 2> "$OUT/steps.err"
echo $? > "$OUT/steps.rc"
systemctl show -p ExecStart --value ffrtmp-exporter.service > "$OUT/execstart"
scrape "$OUT/first.txt"
ff=/usr/local/bin/ffrtmp
$ff run --job-id ok -- true 2>> "$OUT/jobs.err"
$ff run --job-id fails -- sh -c 'exit 3' 2>> "$OUT/jobs.err"
DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent $ff run --job-id ungoverned -- true 2>> "$OUT/jobs.err"
scrape "$OUT/before.txt"
curl -sf -o "$OUT/violations.json" http://127.0.0.1:9464/violations
systemctl restart ffrtmp-exporter.service
scrape "$OUT/restarted.txt"
cp "$OUT/before.txt" /root/before-reboot.txt
