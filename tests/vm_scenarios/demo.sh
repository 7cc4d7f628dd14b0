#!/bin/bash
# scripts/demo.sh on a host whose PID 1 is systemd: its host branch, every frame received.
scripts/demo.sh > "$OUT/demo.out" 2> "$OUT/demo.err"
echo $? > "$OUT/demo.rc"
