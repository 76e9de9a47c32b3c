#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with a GPU and torch, transformers, safetensors,
# pillow, numpy, pyyaml, tqdm and pytest installed (no install step: nothing is fetched):
#
#   bash bench/gpu_check.sh [OUTDIR]        # logs in OUTDIR (default: $OUT, else /tmp/gpu_check)
#
# 1. the CUDA tests: fp32 parity with the CPU, bf16 autocast, generation, tiny training stages,
#    packed rows with FlexAttention (tests/model/test_cuda.py, tests/test_runtime.py);
# 2. bench/cuda_smoke.py: logits CUDA bf16 vs CPU fp32, batched == per-sample generation;
# 3. bench/packed_attention.py in bf16: the issue batch (v2, v1, compiled FlexAttention) and
#    v2 rows of 3808 tokens;
# 4. bench/generate.py on CUDA (decode throughput by batch size; no server).
# Each step has its own time limit, so one that hangs does not take the others with it; the limits
# add up to 510 s, so a 600 s device call ends with every log. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $py (torch.cuda.is_available() is false)" >&2
    exit 2
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run it with a limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ nvidia-smi -L 2>/dev/null; "$py" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'; } | tee "$out/env.log"
step tests 150 "$py" -m pytest -q -p no:cacheprovider tests/model/test_cuda.py tests/test_runtime.py
step cuda_smoke 60 "$py" bench/cuda_smoke.py
step packed_attention 150 "$py" bench/packed_attention.py --device cuda --dtype bf16 --flex --reps 5
step packed_attention_long 90 "$py" bench/packed_attention.py --device cuda --dtype bf16 --versions v2 --copies 4 --reps 5
step generate 60 "$py" bench/generate.py --device cuda --skip-server
echo "gpu_check: $failed step(s) failed; logs in $out"
exit "$failed"
