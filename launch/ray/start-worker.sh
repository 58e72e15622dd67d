#!/usr/bin/env bash
# Join a worker node to the Ray head started by start-head.sh (run on every worker machine).
#
#   RAY_HEAD=10.0.0.1:6379 launch/ray/start-worker.sh
#   RAY_HEAD=10.0.0.1:6379 NUM_CPUS=32 NUM_GPUS=4 launch/ray/start-worker.sh
set -euo pipefail
head=${RAY_HEAD:?set RAY_HEAD=HOST:PORT of the head node}
args=(--address "$head")
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
ray start "${args[@]}" "$@"
