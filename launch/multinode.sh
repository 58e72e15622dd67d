#!/usr/bin/env bash
# Multi-node training without ssh: run this script once on every node (same arguments, each node
# its own NODE_RANK). Node 0's address is the rendezvous point.
#
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh launch/hostfile configs/quickstart.yaml
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh launch/hostfile configs/quickstart.yaml
#
# Extra arguments are dotted config overrides, e.g. zero.stage=3 precision=bf16.
# The deepspeed launcher never restarts a failed rank. With RETRIES=N (default 0) each node reruns
# its launcher up to N times after a failure, and the rerun group resumes from the newest complete
# checkpoint; user errors (exit 2) and a non-finite stop (exit 3) are not retried.
set -uo pipefail
hostfile=${1:?usage: multinode.sh HOSTFILE CONFIG [key=value ...]}
config=${2:?usage: multinode.sh HOSTFILE CONFIG [key=value ...]}
shift 2
for attempt in $(seq 0 "${RETRIES:-0}"); do
  trace-dist train --config "$config" --hostfile "$hostfile" --no-ssh \
    --node-rank "${NODE_RANK:?set NODE_RANK}" --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" \
    --master-port "${MASTER_PORT:-29500}" ${NPROC:+--nproc "$NPROC"} "$@"
  rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -eq 2 ] || [ "$rc" -eq 3 ]; then
    exit "$rc"
  fi
  echo "multinode.sh: node ${NODE_RANK} exited $rc (attempt $((attempt + 1)) of $((${RETRIES:-0} + 1)))" >&2
  sleep "${RETRY_DELAY:-10}"
done
exit "$rc"
