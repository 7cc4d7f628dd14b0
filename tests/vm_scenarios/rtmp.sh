#!/bin/bash
# A live RTMP receiver adopted mid-stream with limits on a real host: every frame arrives.
set -u
. tests/vm_scenarios/lib.sh
export FFRTMP_STATE_DIR=/var/lib/ffrtmp-vmtest
url=rtmp://127.0.0.1:19350/live/s
rm -f /root/received.flv
systemd-run --quiet --scope --unit=receiver \
  ffmpeg -nostdin -loglevel error -listen 1 -i "$url" -c copy -f flv /root/received.flv 2> "$OUT/receiver.err" &
receiver=$!
listening() { ss -Hltn 'sport = :19350' | grep -q .; }
upto 120 listening
ffmpeg -nostdin -loglevel error -re -f lavfi -i testsrc2=size=160x120:rate=10 -t 20 \
  -c:v libx264 -preset ultrafast -tune zerolatency -g 10 -f flv "$url" 2> "$OUT/sender.err" &
sender=$!
upto 120 test -s /root/received.flv
sleep 3  # mid-stream
ffrtmp attach --pid "$receiver" --job-id rtmp --cpu-quota 50 --memory-max 256M 2> "$OUT/attach.err" &
wrapper=$!
upto 60 active ffrtmp-rtmp.scope
c=$(cg ffrtmp-rtmp.scope)
cat "$c/cpu.max" > "$OUT/cpu.max"; cat "$c/memory.max" > "$OUT/memory.max"; cat "$c/cgroup.procs" > "$OUT/procs"
echo "$receiver" > "$OUT/receiver.pid"
stat -c %s /root/received.flv > "$OUT/size-at-attach"
wait "$sender"; echo $? > "$OUT/sender.rc"
wait "$receiver"; echo $? > "$OUT/receiver.rc"
wait "$wrapper"; echo $? > "$OUT/attach.rc"
ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames -of csv=p=0 \
  /root/received.flv > "$OUT/frames"
cp "$FFRTMP_STATE_DIR/results/rtmp.json" "$OUT/"
