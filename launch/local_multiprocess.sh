#!/usr/bin/env bash
# Run one ssr-jax command as N cooperating JAX processes on this machine (CPU), the way a
# TPU pod or GPU cluster runs it, to exercise multi-host code paths without a cluster.
#
# Usage: launch/local_multiprocess.sh train --gin_file=gin/experiments/tiny_default.gin \
#            --gin.MODEL_DIR="'runs/mp'"
# Variables:
#   NUM_PROCESSES        processes to start (default 2); process 0 is the coordinator
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 4): 2 x 4 = one 8-device mesh
#   PORT                 coordinator port on 127.0.0.1 (default 12355; attempt k uses PORT+k)
#   SSR_JAX              the command that runs ssr-jax; may hold arguments, e.g.
#                        ".venv/bin/python -m ssr_jax.cli" (default: .venv/bin/ssr-jax, else
#                        ssr-jax on PATH)
#   LOG_DIR              where each process's log goes: process_<i>.log (default
#                        runs/local_mp_logs); process 0's last lines are echoed at the end
#   HEARTBEAT_TIMEOUT_S  seconds before a silent (dead) process is declared dead and the
#                        others abort (default 60; ssr-jax's --heartbeat_timeout_s)
#   STEP_TIMEOUT_S       exit when no training step finished for this long, e.g. a stuck
#                        peer (default 1800, 3x for the first step; --step_timeout_s)
#   MAX_RESTARTS         rerun the whole group this many times after a failure or a
#                        preemption (default 0); `train` resumes from the last checkpoint in
#                        MODEL_DIR. Statuses: 0 finished (stop), 2 bad input, e.g. a gin error
#                        or a diverged run (stop: a rerun fails the same way), 75 preempted
#                        (SIGTERM; checkpoint saved), 3 watchdog, 1 or a signal: restart
#   KILL_GRACE_S         after one process fails, the others get SIGTERM, then SIGKILL after
#                        this many seconds (default 30)
# Each process gets SSR_JAX_COORDINATOR_ADDRESS / SSR_JAX_NUM_PROCESSES / SSR_JAX_PROCESS_ID
# (read by ssr_jax.distributed), JAX_PLATFORMS=cpu and its own fake devices. If any process
# fails, the others are stopped and the script exits with the first failure's status (after
# the last restart): no silent hang.
set -uo pipefail
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-12355}
LOG_DIR=${LOG_DIR:-runs/local_mp_logs}
MAX_RESTARTS=${MAX_RESTARTS:-0}
KILL_GRACE_S=${KILL_GRACE_S:-30}
if [ -z "${SSR_JAX:-}" ]; then
  if [ -x .venv/bin/ssr-jax ]; then SSR_JAX=.venv/bin/ssr-jax; else SSR_JAX=ssr-jax; fi
fi
[ $# -ge 1 ] || { echo "usage: $0 COMMAND [flags...]" >&2; exit 2; }
mkdir -p "$LOG_DIR"
read -r -a ssr_jax_cmd <<< "$SSR_JAX"

# Whether rerunning after this status can help (the statuses of ssr_jax.distributed).
worth_restarting() {
  case "$1" in
    0) return 1 ;;  # finished
    2) return 1 ;;  # bad input (a UserError): the same command fails the same way again
    *) return 0 ;;  # 75 preempted, 3 watchdog, 1 error, 128+N killed: resume
  esac
}

pids=()
stop_all() {  # SIGTERM the processes still running; SIGKILL them after KILL_GRACE_S
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  ( sleep "$KILL_GRACE_S"; for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done ) &
  killer=$!
}
trap 'echo "interrupted; stopping all processes" >&2; stop_all; wait; exit 130' INT TERM

run_group() {  # $1: attempt number; returns the first failing status (0 if all succeed)
  local attempt=$1 i status=0 rc done_pid alive p
  shift
  pids=()
  killer=
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS:-}" \
    SSR_JAX_COORDINATOR_ADDRESS="127.0.0.1:$((PORT + attempt))" \
    SSR_JAX_NUM_PROCESSES="$NUM_PROCESSES" \
    SSR_JAX_PROCESS_ID="$i" \
    SSR_JAX_HEARTBEAT_TIMEOUT_S="${HEARTBEAT_TIMEOUT_S:-}" \
    SSR_JAX_STEP_TIMEOUT_S="${STEP_TIMEOUT_S:-}" \
      "${ssr_jax_cmd[@]}" "$@" >> "$LOG_DIR/process_$i.log" 2>&1 &
    pids+=($!)
  done
  echo "attempt $((attempt + 1)): started ${NUM_PROCESSES} processes (${pids[*]}); logs in" \
       "$LOG_DIR/process_<i>.log"
  alive=("${pids[@]}")
  while [ "${#alive[@]}" -gt 0 ]; do
    wait -n -p done_pid "${alive[@]}"; rc=$?
    for i in "${!alive[@]}"; do [ "${alive[$i]}" = "$done_pid" ] && unset "alive[$i]"; done
    alive=("${alive[@]}")
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$rc
      if [ "$rc" -eq 75 ]; then
        echo "process with pid $done_pid was preempted (exit 75, checkpoint saved);" \
             "stopping the others" >&2
      else
        echo "process with pid $done_pid failed (exit $rc); stopping the others" >&2
      fi
      stop_all
    fi
  done
  [ -n "$killer" ] && kill "$killer" 2>/dev/null
  return "$status"
}

status=0
for ((attempt = 0; attempt <= MAX_RESTARTS; attempt++)); do
  if [ "$attempt" -gt 0 ]; then
    echo "restarting all processes (attempt $((attempt + 1)) of $((MAX_RESTARTS + 1)));" \
         "training resumes from the last checkpoint" >&2
  fi
  run_group "$attempt" "$@"; status=$?
  worth_restarting "$status" || break
done
tail -n 3 "$LOG_DIR/process_0.log"
exit "$status"
