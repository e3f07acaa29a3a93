#!/bin/bash
# Start standard-protocol comparisons (benchmarks/h200_compare.sh) as background processes on the H200 device machine,
# one process per spec "METHOD|S1 S2 ...|NAME", all at once on the one GPU (measured: no throughput gain over one at
# a time, the fp32 passes fill the GPU; its use is to outlive the 10-minute call limit). Not under $OUT: the device
# machine empties $OUT (/root/out) at every call. They run in their own process sessions (setsid), so they outlive this call for as long as the machine stays warm (each later call must follow within its
# idle time); each writes /root/bg/NAME/compare.json after every cell and /root/bg/NAME.log.
# Bring the results back with benchmarks/h200_poll.sh.
#   usage: DATA=/tmp/data bash benchmarks/h200_compare_bg.sh "wanda|0.6 0.8|wanda60_80" "sparsegpt|0.6|sparsegpt60"
set -euo pipefail
mkdir -p /root/bg
for spec in "$@"; do
    IFS='|' read -r method sparsities name <<< "$spec"
    DEST=/root/bg setsid nohup bash benchmarks/h200_compare.sh "$method" "$sparsities" "$name" \
        > "/root/bg/$name.stdout" 2>&1 < /dev/null &
    echo "started $name: $method at $sparsities"
done
