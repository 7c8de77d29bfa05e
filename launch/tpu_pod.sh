#!/usr/bin/env bash
# Runs the same command on every worker of a TPU pod slice (jax.distributed auto-detects
# the pod topology). The repo must already be on each worker at the same path.
#   launch/tpu_pod.sh my-tpu us-central2-b --config=configs/opd_tiny.py --config.mesh.fsdp=-1
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd $(pwd) && JDISTILL_DISTRIBUTED=auto python -m jdistill train $args"
