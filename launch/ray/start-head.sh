#!/usr/bin/env bash
# Start the Ray head node of a trace-dist Tune cluster (run once, on the head machine).
#
#   NODE_IP=10.0.0.1 launch/ray/start-head.sh                 # CPUs/GPUs detected by Ray
#   NODE_IP=10.0.0.1 NUM_CPUS=32 NUM_GPUS=4 launch/ray/start-head.sh
#   then, on the head: trace-dist tune --config configs/tune/paper.yaml --address auto --output /shared/tune/paper
#
# SECURITY: anyone who can reach a Ray port can run any code on every node of the cluster (Ray has
# no authentication here). NODE_IP is the address the other nodes reach this one at: choose one on
# a private network that only the cluster's machines reach, never a public one, and firewall the
# nodes: Ray 2.60's gcs_server, raylet and workers listen on every interface whatever NODE_IP. The dashboard (it can submit jobs too) listens on 127.0.0.1 unless
# DASHBOARD_HOST says otherwise; reach it with `ssh -L 8265:127.0.0.1:8265 HEAD`.
#
# Every node needs the same Python environment (pip install -e . on a shared checkout or the same
# image) and the same view of --output and of data.path: use a shared filesystem (NFS), or set the
# search config's storage_path to shared storage. DS_ACCELERATOR/OMP_NUM_THREADS are set per job by
# `trace-dist tune` (runtime_env), so nothing is exported here.
set -euo pipefail
node_ip=${NODE_IP:?set NODE_IP to this machine's address on the cluster's private network}
port=${RAY_PORT:-6379}
args=(--head --node-ip-address "$node_ip" --port "$port" --dashboard-host "${DASHBOARD_HOST:-127.0.0.1}" --disable-usage-stats)
[[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
ray start "${args[@]}" "$@"
echo "head started; on each worker node: RAY_HEAD=$node_ip:$port launch/ray/start-worker.sh"
