#!/usr/bin/env bash
# Run ssr-jax on every worker of a Cloud TPU VM pod slice (e.g. v4-64 = 8 hosts).
#
# Usage:
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR=v4-64 launch/tpu_pod.sh create   # once
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh setup    # copy repo, install
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh train \
#       --gin_file=gin/models/t5_1_1/base.gin --gin_file=gin/runs/pretrain.gin \
#       --gin.MODEL_DIR="'gs://my-bucket/ssr_base'"
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh delete
# Variables:
#   TPU_NAME      the TPU VM name (required)
#   ZONE          its zone (required)
#   PROJECT       GCP project (default: gcloud's configured project)
#   ACCELERATOR   slice type for `create`, e.g. v4-32, v5litepod-64 (default v4-32)
#   RUNTIME       TPU VM software version for `create` (default tpu-ubuntu2204-base)
#   REPO_DIR      where the repo lives on the workers (default ~/ssr-jax)
# Every worker runs the same command (JAX's multi-controller model): jax.distributed finds
# the pod's workers from the TPU metadata, so no coordinator flags are needed. MODEL_DIR
# should be a gs:// path that all workers can write.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO_DIR=${REPO_DIR:-'~/ssr-jax'}
project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project="$PROJECT")
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" \
    --worker=all --command="$1"
}
cmd=${1:?usage: $0 create|setup|train|eval|infer|generate-spans|delete [flags]}
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
      python3 -m venv .venv && .venv/bin/pip install -q 'jax[tpu]' && .venv/bin/pip install -q -e ." ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --quiet ;;
  *)
    # Quote each argument for the remote shell so gin strings survive.
    args=$(printf " %q" "$@")
    ssh_all "cd $REPO_DIR && TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/ssr-jax $cmd$args" ;;
esac
