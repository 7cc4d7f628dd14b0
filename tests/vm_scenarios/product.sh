#!/bin/bash
# ffrtmp on a real v2 host (systemd as PID 1): limits next to systemd-run's, release, live values,
# OOM in run and attach, a non-root user. Leaves what it saw in $OUT; tests/test_vm_product.py judges.
set -u
export FFRTMP_STATE_DIR=/var/lib/ffrtmp-vmtest
. tests/vm_scenarios/lib.sh
dump() { # PREFIX DIR: the cgroup files a limit lands in
  for f in cpu.max cpu.weight memory.max io.max io.weight; do tr '\n' ' ' < "$2/$f" > "$OUT/$1.$f"; done
}
{ cat /proc/1/comm; stat -fc %T /sys/fs/cgroup; systemctl --version | head -1; } > "$OUT/host"

# Limits: ours next to systemd-run's for the same values (bytes: systemd reads "1M" of a bandwidth as
# 1000000, ffrtmp as 1048576); then release; live values meanwhile.
dev=/dev/vda
ffrtmp run --job-id lim --cpu-quota 50 --cpu-weight 200 --memory-max 64M --io-weight 300 \
  --io-max "$dev rbps=1M wbps=2M riops=100 wiops=200" -- sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 600' \
  2> "$OUT/lim.err" &
lim=$!
systemd-run --quiet --scope --unit=ref -p CPUQuota=50% -p CPUWeight=200 -p MemoryMax=64M -p IOWeight=300 \
  -p "IOReadBandwidthMax=$dev 1048576" -p "IOWriteBandwidthMax=$dev 2097152" -p "IOReadIOPSMax=$dev 100" \
  -p "IOWriteIOPSMax=$dev 200" sleep 600 &
upto 120 active ffrtmp-lim.scope && upto 120 active ref.scope
is_sleep() { [ "$(cat "/proc/$(head -1 "$(cg ffrtmp-lim.scope)/cgroup.procs")/comm")" = sleep ]; }
upto 120 is_sleep
dump ours "$(cg ffrtmp-lim.scope)"
dump ref "$(cg ref.scope)"
ffrtmp ls --json > "$OUT/ls.json"
ffrtmp ls > "$OUT/ls.txt"
ffrtmp exporter --listen 127.0.0.1:9464 2> "$OUT/exporter.err" &
exporter=$!
upto 120 curl -sf -o "$OUT/metrics.txt" http://127.0.0.1:9464/metrics
kill "$exporter"; wait "$exporter"
ffrtmp release lim > "$OUT/release.out" 2>&1
dump released "$(cg ffrtmp-lim.scope)"
kill $(cat "$(cg ffrtmp-lim.scope)/cgroup.procs")
wait "$lim"; echo $? > "$OUT/lim.rc"
systemctl stop ref.scope

# OOM, run: the shell outlives its OOM-killed child with its sibling (same script as tests/test_run.py).
OOM_CHILD='systemctl show -p OOMPolicy --value "ffrtmp-$1.scope"; sleep 60 & s=$!;
python3 -c "b = bytearray(300 << 20)"; echo child=$?; sleep "$0"; kill -0 $s && echo sibling=alive; kill $s; exit 7'
ffrtmp run --job-id oomc --memory-max 40M -- sh -c "$OOM_CHILD" 5 oomc > "$OUT/oomc.out" 2> "$OUT/oomc.err"
echo $? > "$OUT/oomc.rc"
# What systemd's default OOMPolicy does to the same job: stops the whole scope.
systemd-run --quiet --scope --unit=oomref -p MemoryMax=40M sh -c "${OOM_CHILD#*;}" 5 > "$OUT/oomref.out" 2>&1
echo $? > "$OUT/oomref.rc"
# The job's only process is the victim; and a limit below what any exec needs.
for j in hog1 hog2 hog3; do
  ffrtmp run --job-id $j --memory-max 40M -- python3 -c "b = bytearray(300 << 20)" 2> "$OUT/$j.err"; echo $? > "$OUT/$j.rc"
done
for m in 4K 1; do ffrtmp run --job-id tiny$m --memory-max $m -- true 2> "$OUT/tiny$m.err"; echo $? > "$OUT/tiny$m.rc"; done

# OOM, attach: an adopted parent whose child is OOM-killed keeps running.
rm -f /root/oom.fifo /root/parent.out; mkfifo /root/oom.fifo
adopt() { # UNIT JOB CMD...: CMD in a scope UNIT of its own, then attached as JOB under 40M; PIDs in $pid, $wrapper
  local unit=$1 job=$2; shift 2
  systemd-run --quiet --scope --unit="$unit" "$@" &
  pid=$!
  upto 120 active "$unit.scope"
  ffrtmp attach --pid "$pid" --job-id "$job" --memory-max 40M 2> "$OUT/$job.err" &
  wrapper=$!
  upto 120 active "ffrtmp-$job.scope"
}
adopt parent aoom sh -c 'read x < /root/oom.fifo; python3 -c "b = bytearray(300 << 20)";
  echo child=$? > /root/parent.out; read x < /root/oom.fifo; echo bye >> /root/parent.out'
parent=$pid
echo go > /root/oom.fifo
upto 120 grep -q child= /root/parent.out
sleep 5  # systemd's default policy would stop the scope within this
kill -0 "$parent" && echo alive > "$OUT/aoom.parent"
systemctl show -p ActiveState,OOMPolicy ffrtmp-aoom.scope > "$OUT/aoom.show"
echo bye > /root/oom.fifo
wait "$parent"; echo $? > "$OUT/aoom.parent.rc"
wait "$wrapper"; echo $? > "$OUT/aoom.rc"
cp /root/parent.out "$OUT/aoom.parent.out"

# OOM, attach: the adopted process is the job's only one and the victim (the kernel's log tells).
rm -f /root/hog.fifo; mkfifo /root/hog.fifo
adopt hogp ahog python3 -c 'open("/root/hog.fifo").read(); b = bytearray(300 << 20)'
echo go > /root/hog.fifo
wait "$pid"; echo $? > "$OUT/ahog.pid.rc"
wait "$wrapper"; echo $? > "$OUT/ahog.rc"

# A user without a polkit rule: the workload runs, ungoverned, and one line says so.
id vmuser > /dev/null 2>&1 || useradd -m vmuser
runuser -u vmuser -- env FFRTMP_STATE_DIR=/tmp/vmuser-state "$(command -v ffrtmp)" run --job-id u -- \
  sh -c 'echo workload-ran; exit 3' > "$OUT/user.out" 2> "$OUT/user.err"
echo $? > "$OUT/user.rc"
cp /tmp/vmuser-state/results/u.json "$OUT/user.json"

cp -r "$FFRTMP_STATE_DIR/results" "$OUT/results"
journalctl -q --no-pager -u 'ffrtmp-*' -u oomref.scope > "$OUT/journal.txt" 2>&1
