#!/usr/bin/env bash
# Run one ssr-jax command as N cooperating JAX processes on this machine (CPU), the way a
# TPU pod or GPU cluster runs it, for testing multi-host code paths without a cluster.
#
# Usage: launch/local_multiprocess.sh train --gin_file=gin/experiments/tiny_default.gin \
#            --gin.MODEL_DIR="'runs/mp'"
# Variables:
#   NUM_PROCESSES      processes to start (default 2)
#   DEVICES_PER_PROCESS fake CPU devices per process (default 4)
#   PORT               coordinator port on 127.0.0.1 (default 12355)
#   SSR_JAX            the ssr-jax executable (default: .venv/bin/ssr-jax, else on PATH)
#   LOG_DIR            where each process's log goes (default: runs/local_mp_logs)
# Process 0 is the coordinator. If any process fails, the others are stopped and the script
# exits with that process's status (no silent hang).
set -uo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-12355}
LOG_DIR=${LOG_DIR:-runs/local_mp_logs}
if [ -z "${SSR_JAX:-}" ]; then
  if [ -x .venv/bin/ssr-jax ]; then SSR_JAX=.venv/bin/ssr-jax; else SSR_JAX=ssr-jax; fi
fi
[ $# -ge 1 ] || { echo "usage: $0 COMMAND [flags...]" >&2; exit 2; }
mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS:-}" \
  SSR_JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" \
  SSR_JAX_NUM_PROCESSES="$NUM_PROCESSES" \
  SSR_JAX_PROCESS_ID="$i" \
    "$SSR_JAX" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started ${NUM_PROCESSES} processes (${pids[*]}); logs in $LOG_DIR/"

status=0
remaining=${#pids[@]}
while [ "$remaining" -gt 0 ]; do
  wait -n -p done_pid "${pids[@]}"; rc=$?
  remaining=$((remaining - 1))
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "process with pid $done_pid failed (exit $rc); stopping the others" >&2
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  fi
done
tail -n 3 "$LOG_DIR/process_0.log"
exit "$status"
