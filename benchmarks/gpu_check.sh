#!/usr/bin/env bash
# One-shot GPU check (under 5 minutes on one GPU): the embedded models on CUDA in bfloat16
# through the command-line analyses, one R_o evaluation, a few SPPFT steps, and SPPFT sharded with
# FSDP2 over every GPU (one process per GPU, NCCL; a world of one on a one-GPU machine), with its
# frozen layers checked bit-identical in the gathered checkpoint, printing each step's result and
# wall time.  Installs nothing: it expects the project's venv (make setup).
#
#   bash benchmarks/gpu_check.sh                 # writes under results/gpu_check
#   OUT=/tmp/gpu_check PY=python bash benchmarks/gpu_check.sh
#   ONLY=sharded_sppft,sharded_check bash benchmarks/gpu_check.sh   # only the named steps
#
# Exit status: 0 when every step passed, 1 when one failed (the others still run), 2 without CUDA.
# Notes:
# - analyses.sppft has no --dtype: its fine-tuning runs in float32 (the paper's setting) on --device.
# - the safety range is read from docs/locate/located.json as START,END (located on the float32
#   weights; load_located would also accept the bfloat16 copy through its bf16 fingerprint).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/gpu_check}
DEVICE=${DEVICE:-cuda}
STEP_TIMEOUT=${STEP_TIMEOUT:-200}
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then  # a dry run of the script itself, e.g. DEVICE=cpu
    echo "device: $DEVICE (GPU_CHECK_ALLOW_CPU=1: not a GPU check)"
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device (python: $PY); nothing run" >&2
    exit 2
else
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'
fi

RANGE=$("$PY" -c 'import json; r = json.load(open("docs/locate/located.json")); print("%d,%d %s" % (r["range"]["start"], r["range"]["end"], r["alpha"]))')
LAYERS=${RANGE% *}
ALPHA=${RANGE#* }
echo "safety range from docs/locate/located.json: [$LAYERS], alpha $ALPHA"

failed=()
total_start=$(date +%s.%N)

step() {  # step NAME COMMAND...: run with a timeout, print the output's tail, the status and the time
    local name=$1; shift
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
    local log="$OUT/$name.log"
    local start end status
    echo
    echo "=== $name: $*"
    start=$(date +%s.%N)
    timeout "$STEP_TIMEOUT" "$@" >"$log" 2>&1
    status=$?
    end=$(date +%s.%N)
    grep -v -E "it/s\]|s/it\]|^\s*$" "$log" | tail -n 25
    local seconds
    seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    if [ "$status" -eq 0 ]; then
        echo "--- $name: OK in ${seconds}s (log: $log)"
    else
        [ "$status" -eq 124 ] && echo "--- $name: TIMED OUT after ${STEP_TIMEOUT}s"
        echo "--- $name: FAILED (exit $status) in ${seconds}s (log: $log)"
        failed+=("$name")
    fi
}

step safety "$PY" -m analyses.safety --model embedded --device "$DEVICE" --dtype bfloat16 --limit 20 \
    --out "$OUT/safety"

step existence "$PY" -m analyses.existence --model embedded --device "$DEVICE" --dtype bfloat16 --n 40 --pairs \
    --n-boot 200 --out "$OUT/existence"

step over_rejection "$PY" -c "
import time, torch, interp
from interp.ranges import LayerRange
start, end = map(int, '$LAYERS'.split(','))
model = interp.load_model('embedded', device='$DEVICE', dtype=torch.bfloat16)
queries = interp.over_rejection_prompts(limit=40, sample='spread')
for layers, alpha in ((None, 1.0), (LayerRange(start, end), $ALPHA)):
    t = time.perf_counter()
    r_o = interp.over_rejection_at(model, queries, layers, alpha)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    print(f'R_o layers={layers} alpha={alpha}: {r_o}/{len(queries)} in {time.perf_counter() - t:.1f}s')
evaluator = interp.RoEvaluator(model, queries, start=start)
t = time.perf_counter()
print(f'RoEvaluator layers=[{start},{end}] alpha=$ALPHA: {evaluator.count(LayerRange(start, end), $ALPHA)} '
      f'in {time.perf_counter() - t:.1f}s (must equal the line above)')
if torch.cuda.is_available():
    print(f'max GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB')
"

step sppft "$PY" -m analyses.sppft --model embedded --device "$DEVICE" --layers "$LAYERS" --data implicit \
    --modes sppft --seeds 0 --steps 4 --eval-steps 0,4 --batch-size 4 --train-size 16 --dose-limit 10 \
    --final-limit 10 --quality 4 --no-audit --out "$OUT/sppft"

NGPU=$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')
step sharded_sppft "$PY" -m torch.distributed.run --nproc-per-node "$NGPU" --master-addr 127.0.0.1 \
    --master-port "${SHARDED_PORT:-29561}" -m analyses.sppft --train-only --model embedded --layers "$LAYERS" \
    --data implicit --modes sppft --seeds 0 --steps 4 --batch-size $((2 * NGPU)) --train-size 16 --out "$OUT/sharded"

step sharded_check "$PY" -c "
import json, torch
from finetune import masks as M
from interp.models import load_model
start, end = map(int, '$LAYERS'.split(','))
config = json.load(open('$OUT/sharded/config.json'))
print(f\"sharded over {config['world_size']} process(es), backend {config['backend']}, device {config['device']}\")
before = M.named_parameters(load_model('embedded', device='cpu', bridge=False))
after = M.named_parameters(load_model('$OUT/sharded/model', device='cpu', bridge=False))
frozen = set(M.layer_parameters(load_model('embedded', device='cpu', bridge=False), range(start, end + 1)))
assert frozen == set(config['frozen_parameters']), 'frozen names differ'
same = [n for n in before if torch.equal(before[n], after[n])]
assert set(same) == frozen, f'bit-identical: {len(same)} parameters, frozen: {len(frozen)}'
print(f'{len(frozen)} frozen parameters bit-identical, the other {len(before) - len(frozen)} moved; losses', [round(h['loss'], 4) for h in json.load(open('$OUT/sharded/log.json'))])
"

total=$(awk -v a="$total_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed in ${total}s (results under $OUT)"
    exit 0
fi
echo "gpu_check: FAILED steps: ${failed[*]} (total ${total}s; logs under $OUT)"
exit 1
