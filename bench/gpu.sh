#!/usr/bin/env bash
# Every GPU measurement in one prepared run, within 8 minutes (the parts' time limits add up
# to 470 s; the script has not yet run on a GPU):
#   1. gpu_check     fused (cuDNN) attention vs einsum attention on the device: logits, grads
#   2. gpu_mfu       bf16 MFU of the T5 1.1 base and large train step at 512/114
#   3. gpu_sampling  teacher sampling new tokens/s at batch 64 and 256 vs HF generate
#                    (top-p 0.9, top-k 50) on the same GPU and vs the memory-bandwidth bound
#   4. gpu_ssr_step  the online SSR step (teacher large ~4x student base) vs span corruption
# Each part runs in its own process under its own time limit, so one failure or hang leaves
# the others' figures; the markdown tables go to stdout and, when $OUT is set, to
# $OUT/gpu.md with each part's JSON and log beside it.
#
# Usage: bench/gpu.sh [--smoke] [--quick] [--bandwidth_tb_s=X]
#   --smoke   tiny shapes on any device (a CPU too): checks the whole script in about a minute
# Needs: jax (with CUDA), flax, optax, orbax-checkpoint, torch, transformers; not TensorFlow,
# seqio or gin (the code paths used here import none of them). Install for a GPU:
#   pip install -e '.[cuda,hf]'  (or run from the repository as is: PYTHONPATH is set here)
# Variables: PYTHON (default .venv/bin/python if present, else python3), OUT, and the limits
#   LIMIT_CHECK_S LIMIT_MFU_S LIMIT_SAMPLING_S LIMIT_SSR_S (seconds per part).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SMOKE=0
for a in "$@"; do [ "$a" = "--smoke" ] && SMOKE=1; done
if [ "$SMOKE" = 1 ]; then DEFAULT=(120 120 180 120); else DEFAULT=(60 150 180 80); fi
LIMITS=("${LIMIT_CHECK_S:-${DEFAULT[0]}}" "${LIMIT_MFU_S:-${DEFAULT[1]}}"
        "${LIMIT_SAMPLING_S:-${DEFAULT[2]}}" "${LIMIT_SSR_S:-${DEFAULT[3]}}")
PARTS=(gpu_check gpu_mfu gpu_sampling gpu_ssr_step)
DIR=${OUT:-$(mktemp -d)}
mkdir -p "$DIR"
# Programs shared between parts (the base train step, the batch-64 teacher sampler) compile
# once: a persistent XLA cache for this run.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/ssr_jax_gpu_xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
export TF_CPP_MIN_LOG_LEVEL=3

REPORT="$DIR/gpu.md"
{
    echo "# GPU measurements ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    if command -v nvidia-smi > /dev/null; then
        echo '```'
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
        echo '```'
    else
        echo "(no nvidia-smi on this machine)"
    fi
    echo
} > "$REPORT"

status=0
for i in "${!PARTS[@]}"; do
    part=${PARTS[$i]}
    limit=${LIMITS[$i]}
    # The sampling part shares the GPU with torch: JAX must not take 75% of it up front.
    prealloc=true; [ "$part" = gpu_sampling ] && prealloc=false
    rm -f "$DIR/$part.json"
    t0=$(date +%s)
    XLA_PYTHON_CLIENT_PREALLOCATE=$prealloc timeout --kill-after=10 "$limit" \
        "$PYTHON" "bench/$part.py" "$@" --json="$DIR/$part.json" \
        > "$DIR/$part.md" 2> "$DIR/$part.log"
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        { cat "$DIR/$part.md"; echo; echo "($part: ${secs} s)"; echo; } >> "$REPORT"
    else
        status=1
        why="exit $rc"; [ $rc -eq 124 ] || [ $rc -eq 137 ] && why="timed out after ${limit} s"
        { echo "### $part: FAILED ($why)"; echo; echo '```'; tail -n 15 "$DIR/$part.log"
          echo '```'; echo
          # Rows measured before the failure (the scripts write them as they go).
          if [ -s "$DIR/$part.json" ]; then
              "$PYTHON" -c 'import json, sys; sys.path.insert(0, "bench"); import common
print(common.render(json.load(open(sys.argv[1]))))' "$DIR/$part.json" && echo
              echo "(partial: the rows measured before the failure)"; echo
          fi; } >> "$REPORT"
    fi
    echo "$part: rc=$rc, ${secs} s" >&2
done
cat "$REPORT"
exit $status
