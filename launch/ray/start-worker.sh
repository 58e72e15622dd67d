#!/usr/bin/env bash
# Join a worker node to the Ray head started by start-head.sh (run on every worker machine).
#
#   RAY_HEAD=10.0.0.1:6379 NODE_IP=10.0.0.2 launch/ray/start-worker.sh
#   RAY_HEAD=10.0.0.1:6379 NODE_IP=10.0.0.2 NUM_CPUS=32 NUM_GPUS=4 launch/ray/start-worker.sh
#
# SECURITY: anyone who can reach a Ray port can run any code on the cluster. NODE_IP is the
# address the other nodes reach this one at (default: the one this machine reaches the head from):
# a private network only, and firewall the nodes, because Ray 2.60's gcs_server, raylet and
# workers listen on every interface whatever the node address.
set -euo pipefail
head=${RAY_HEAD:?set RAY_HEAD=HOST:PORT of the head node}
args=(--address "$head" --disable-usage-stats)
[[ -n "${NODE_IP:-}" ]] && args+=(--node-ip-address "$NODE_IP")
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
ray start "${args[@]}" "$@"
