#!/usr/bin/env bash
# The demonstration itself; needs a systemd on the system bus (the host's, or tests/sandbox.py's).
set -euo pipefail
dir=$(mktemp -d /var/tmp/ffrtmp-demo.XXXXXX)
export FFRTMP_STATE_DIR=$dir/state
port=$((20000 + RANDOM % 20000))
url=rtmp://127.0.0.1:$port/live/demo
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. A live RTMP receiver (ffmpeg -listen 1), fed in real time for 8 s"
ffmpeg -nostdin -loglevel fatal -listen 1 -i "$url" -c copy -f flv "$dir/received.flv" &
receiver=$!
until ss -Hltn "sport = :$port" | grep -q .; do  # listening (slow hosts take seconds)
  kill -0 "$receiver" || { echo "demo: the receiver did not start" >&2; exit 1; }; sleep 0.1
done
ffmpeg -nostdin -loglevel error -re -f lavfi -i testsrc2=size=640x360:rate=30 -t 8 \
  -c:v libx264 -preset ultrafast -tune zerolatency -g 30 -f flv "$url" &
sender=$!
sleep 2

say "2. ffrtmp attach --pid $receiver: adopted mid-stream, no pause, no signal"
mkfifo "$dir/attach.log"
ffrtmp attach --pid "$receiver" --job-id demo-attach --cpu-quota 50 --memory-max 256M --intent demo \
  2> "$dir/attach.log" &
attach=$!
exec 3< "$dir/attach.log"
while IFS= read -r line <&3; do echo "$line" >&2; [[ $line == *"adopted into"* ]] && break; done
cat <&3 >&2 &  # its summary line, later
systemctl --no-pager status ffrtmp-demo-attach.scope | head -n 9

say "3. ffrtmp run: a transcode started already inside its own scope"
ffrtmp run --job-id demo-run --cpu-quota 100 --memory-max 512M --intent demo -- \
  ffmpeg -nostdin -loglevel error -f lavfi -i testsrc2=size=640x360:rate=30 -t 3 \
  -c:v libx264 -preset ultrafast -y "$dir/transcoded.mp4"

wait "$sender"
wait "$attach"
say "4. The frozen records"
ffrtmp show demo-attach
ffrtmp show demo-run
frames=$(ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames -of csv=p=0 "$dir/received.flv")
say "5. The stream was never interrupted: $frames of 240 frames received"
rm -rf "$dir"
