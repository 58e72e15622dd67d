#!/usr/bin/env bash
# Multi-node training without ssh: run this script once on every node (same arguments, each node
# its own NODE_RANK). Node 0's address is the rendezvous point.
#
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh launch/hostfile configs/quickstart.yaml
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh launch/hostfile configs/quickstart.yaml
#
# Extra arguments are dotted config overrides, e.g. zero.stage=3 precision=bf16.
set -euo pipefail
hostfile=${1:?usage: multinode.sh HOSTFILE CONFIG [key=value ...]}
config=${2:?usage: multinode.sh HOSTFILE CONFIG [key=value ...]}
shift 2
exec trace-dist train --config "$config" --hostfile "$hostfile" --no-ssh \
  --node-rank "${NODE_RANK:?set NODE_RANK}" --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" \
  --master-port "${MASTER_PORT:-29500}" ${NPROC:+--nproc "$NPROC"} "$@"
