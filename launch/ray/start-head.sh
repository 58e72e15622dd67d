#!/usr/bin/env bash
# Start the Ray head node of a trace-dist Tune cluster (run once, on the head machine).
#
#   launch/ray/start-head.sh                      # CPUs/GPUs detected by Ray
#   NUM_CPUS=32 NUM_GPUS=4 launch/ray/start-head.sh
#   then, on the head: trace-dist tune --config configs/tune/paper.yaml --address auto --output /shared/tune/paper
#
# Every node needs the same Python environment (pip install -e . on a shared checkout or the same
# image) and the same view of --output and of data.path: use a shared filesystem (NFS), or set the
# search config's storage_path to shared storage. DS_ACCELERATOR/OMP_NUM_THREADS are set per job by
# `trace-dist tune` (runtime_env), so nothing is exported here.
set -euo pipefail
port=${RAY_PORT:-6379}
args=(--head --port "$port" --dashboard-host 0.0.0.0)
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
ray start "${args[@]}" "$@"
echo "head started; on each worker node: RAY_HEAD=$(hostname -I 2>/dev/null | awk '{print $1}'):$port launch/ray/start-worker.sh"
