#!/usr/bin/env bash
# N processes on this machine (CPU, gloo collectives), e.g. to rehearse a multi-host run:
#   launch/local_multiprocess.sh 2 --config=configs/opd_tiny.py --config.train.steps=4
set -euo pipefail
n=${1:?number of processes}; shift
port=${JDISTILL_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  JDISTILL_COORDINATOR=127.0.0.1:$port JDISTILL_NUM_PROCESSES=$n JDISTILL_PROCESS_ID=$i \
    JAX_PLATFORMS=cpu python -m jdistill train "$@" > "jdistill_proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 20 jdistill_proc0.log
exit $status
