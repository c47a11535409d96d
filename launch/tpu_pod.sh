#!/usr/bin/env bash
# Run ssr-jax on every worker of a Cloud TPU VM pod slice (e.g. v4-64 = 8 hosts).
#
# Usage:
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR=v4-64 launch/tpu_pod.sh create   # once
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh setup    # copy repo, pip install -e '.[tpu]'
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh train \
#       --gin_file=gin/models/t5_1_1/base.gin --gin_file=gin/runs/pretrain.gin \
#       --gin.MODEL_DIR="'gs://my-bucket/ssr_base'"
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh stop     # end a run on all workers
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh delete
# Any other subcommand (eval, infer, generate-spans, ...) runs like train.
# Variables:
#   TPU_NAME             the TPU VM name (required)
#   ZONE                 its zone (required)
#   PROJECT              GCP project (default: gcloud's configured project)
#   ACCELERATOR          slice type for `create`, e.g. v4-32, v5litepod-64 (default v4-32)
#   RUNTIME              TPU VM software version for `create` (default tpu-ubuntu2204-base)
#   REPO_DIR             where the repo lives on the workers (default ~/ssr-jax)
#   HEARTBEAT_TIMEOUT_S  a worker silent this long is declared dead and the others abort
#                        (default 60)
#   STEP_TIMEOUT_S       exit when no training step finished for this long (default 1800;
#                        the first step gets 3x)
#   MAX_RESTARTS         rerun on all workers this many times after a failure or a
#                        preemption (default 0); training resumes from the last checkpoint in
#                        MODEL_DIR. Statuses: 0 finished and 2 bad input (a gin error, a
#                        diverged run) stop; 75 preempted (SIGTERM, checkpoint saved),
#                        3 watchdog, 1 or a signal restart
# Every worker runs the same command (JAX's multi-controller model) with
# SSR_JAX_MULTIPROCESS=1: ssr_jax calls jax.distributed.initialize(), which finds the pod's
# workers and the coordinator (worker 0) from the TPU metadata, so no coordinator flags are
# needed. MODEL_DIR should be a gs:// path every worker can write: each writes its own
# checkpoint shards; worker 0 writes the logs and TensorBoard.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO_DIR=${REPO_DIR:-'~/ssr-jax'}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PID_FILE=/tmp/ssr-jax-run.pid
project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project="$PROJECT")
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" \
    --worker=all --command="$1"
}
# Whether rerunning after this status can help (the statuses of ssr_jax.distributed).
worth_restarting() {
  case "$1" in
    0) return 1 ;;  # finished
    2) return 1 ;;  # bad input (a UserError): the same command fails the same way again
    *) return 0 ;;  # 75 preempted, 3 watchdog, 1 error, 128+N killed: resume
  esac
}
stop_all() {  # the run's own process on each worker, by the pid it recorded
  ssh_all "if [ -f $PID_FILE ]; then kill \$(cat $PID_FILE) 2>/dev/null; rm -f $PID_FILE; fi; true"
}
cmd=${1:?usage: $0 create|setup|train|eval|infer|generate-spans|stop|delete [flags]}
shift
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ;;
  setup)
    tar czf /tmp/ssr-jax.tgz --exclude=.venv --exclude=runs --exclude=.git .
    gcloud compute tpus tpu-vm scp /tmp/ssr-jax.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" \
      "${project_flag[@]}" --worker=all
    ssh_all "mkdir -p $REPO_DIR && tar xzf /tmp/ssr-jax.tgz -C $REPO_DIR && cd $REPO_DIR && \
      python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]' -c constraints.txt" ;;
  stop)
    stop_all ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --quiet ;;
  *)
    # Quote each argument for the remote shell so gin strings survive; exec so the recorded
    # pid is ssr-jax's own.
    args=$(printf " %q" "$@")
    remote="cd $REPO_DIR && echo \$\$ > $PID_FILE && exec env TF_CPP_MIN_LOG_LEVEL=3 \
SSR_JAX_MULTIPROCESS=1 SSR_JAX_HEARTBEAT_TIMEOUT_S=${HEARTBEAT_TIMEOUT_S:-} \
SSR_JAX_STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-} .venv/bin/ssr-jax $cmd$args"
    for ((attempt = 0; ; attempt++)); do
      status=0
      ssh_all "$remote" || status=$?
      [ "$status" -eq 0 ] && break
      # Survivors abort within HEARTBEAT_TIMEOUT_S; make sure none is left before rerunning.
      stop_all || true
      if [ "$status" -eq 75 ]; then what="was preempted"; else what="failed"; fi
      if [ "$attempt" -ge "$MAX_RESTARTS" ] || ! worth_restarting "$status"; then
        echo "ssr-jax $cmd $what on the pod (exit $status)" >&2
        exit "$status"
      fi
      echo "ssr-jax $cmd $what (exit $status); restart $((attempt + 1)) of $MAX_RESTARTS" \
           "resumes from the last checkpoint" >&2
    done ;;
esac
