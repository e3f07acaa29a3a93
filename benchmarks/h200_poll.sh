#!/bin/bash
# Wait up to SECONDS (default 500) for the background comparisons of benchmarks/h200_compare_bg.sh, copying every
# NAME/compare.json and NAME.log under /root/bg to $OUT (as NAME.json, NAME.log) every 15 s, so that a call cut by
# its time limit still brings back every finished cell; then print each one's progress.
#   usage: bash benchmarks/h200_poll.sh [SECONDS]
set -u
deadline=$((SECONDS + ${1:-500}))
collect() {
    for log in /root/bg/*.log; do
        [ -f "$log" ] || continue
        name=$(basename "$log" .log)
        cp "$log" "$OUT/$name.log"
        [ -f "/root/bg/$name/compare.json" ] && cp "/root/bg/$name/compare.json" "$OUT/$name.json"
    done
}
while [ $SECONDS -lt $deadline ] && pgrep -f "atprune.cli compare" > /dev/null; do collect; sleep 15; done
collect
pgrep -fa "atprune.cli compare" | cut -c1-160 || echo "no comparison running"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
for log in /root/bg/*.log; do
    echo "== $(basename "$log" .log)"; grep -E "^\[[0-9]+/[0-9]+\]|Error|error" "$log" | tail -12
done
tail -3 /root/bg/*.stdout
