#!/bin/bash
# Wait up to SECONDS (default 500) for the background comparisons of benchmarks/h200_compare_bg.sh, printing each
# one's progress, then copy every NAME/compare.json and NAME.log under /root/bg to $OUT (as NAME.json, NAME.log).
#   usage: bash benchmarks/h200_poll.sh [SECONDS]
set -u
deadline=$((SECONDS + ${1:-500}))
while [ $SECONDS -lt $deadline ] && pgrep -f "atprune.cli compare" > /dev/null; do sleep 15; done
pgrep -fa "atprune.cli compare" | cut -c1-160 || echo "no comparison running"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
for log in /root/bg/*.log; do
    name=$(basename "$log" .log)
    echo "== $name"; grep -E "^\[[0-9]+/[0-9]+\]|Error|error" "$log" | tail -12
    cp "$log" "$OUT/$name.log"
    [ -f "/root/bg/$name/compare.json" ] && cp "/root/bg/$name/compare.json" "$OUT/$name.json"
done
tail -3 /root/bg/*.stdout
