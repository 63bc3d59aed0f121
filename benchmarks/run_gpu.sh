#!/usr/bin/env bash
# The GPU tier in one call, sized for one GPU in <= 8 minutes with QUICK shapes (the default):
#   1. the GPU tests (pytest -m gpu), at most TEST_BUDGET seconds (default 120),
#   2. the layer benchmark (bench_linear.py --quick: the goal shapes 4096->4096, 4096->11008, 11008->4096,
#      M in {1, 16, 2048, 8192}, fp16 + bf16; fwd and fwd+bwd cases) within LINEAR_BUDGET seconds (default 170),
#   3. the host overhead per call on the GPU (bench_overhead.py, this checkout only),
#   4. the end-to-end benchmark (bench_e2e.py --quick: a 7B-shaped Llama with 4 layers; decode with static cache
#      + torch.compile / CUDA graphs, prefill of 2048 tokens, a SparseLoRA vs peft LoRA step at 8 x 512),
#   5. the goal table of issue 13 (benchmarks/goals.py: goal, target, measured, pass / FAIL / missing), last.
# QUICK=0 runs full shapes, 32 layers and the other benchmarks (bench_prune, bench_train_step): far over 8 minutes.
# Every row goes to $OUT/<gpu>.jsonl (device, versions, git commit and date in each row); copy that file into
# benchmarks/results/<gpu>.jsonl and commit it. Logs go to $OUT/*.log. Runs from a plain checkout (PYTHONPATH).
# Options: OUT=dir (default benchmarks/results/gpu-run-<date>), PYTHON=..., QUICK=0|1, STAGES="tests linear
# overhead e2e" (a subset reruns a stage), BENCH_ARGS / E2E_ARGS (extra arguments), *_BUDGET seconds.
# Checked on CPU without a GPU (tests/test_bench_linear.py, tests/test_bench_e2e.py): the no-GPU exit, the
# goal table, bench_e2e's tiny CPU mode. Stack of the lent H200: torch 2.11+cu130, triton 3.6, transformers 5.17.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-$ROOT/benchmarks/results/gpu-run-$(date -u +%Y%m%dT%H%M%S)}
QUICK=${QUICK:-1}
STAGES=${STAGES:-tests linear overhead e2e}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
status=0
start=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - start )) s since start)"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

stage environment | tee "$OUT/env.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())" 2>&1
  for pkg in transformers peft accelerate safetensors numpy pytest; do
    "$PY" -c "import $pkg; print('$pkg', $pkg.__version__)" 2>&1 | tail -1
  done
} | tee -a "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to $PY: nothing to run" | tee -a "$OUT/env.txt"
  exit 2
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
ROWS="$OUT/$GPU.jsonl"

if wanted tests; then
  stage "GPU tests"
  timeout "${TEST_BUDGET:-120}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
  [ "$tests_rc" -eq 0 ] || status=1
  [ "$tests_rc" -eq 124 ] && echo "GPU tests stopped after ${TEST_BUDGET:-120} s (TEST_BUDGET)"
fi

if wanted linear; then
  stage "layer benchmark"
  if [ "$QUICK" = "1" ]; then
    linear_args="--quick --cases fwd lora_fwd_bwd --providers torch24 cslt triton24 full_ft dense_lora dense_gemm_lora triton_lora triton24_lora"
  else
    linear_args=""
  fi
  # shellcheck disable=SC2086
  BENCH_ALLOW_ERRORS=1 "$PY" benchmarks/bench_linear.py --out "$ROWS" $linear_args \
    --time-budget "${LINEAR_BUDGET:-170}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_linear.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wanted overhead; then
  stage "host overhead"
  "$PY" benchmarks/bench_overhead.py --device cuda --baseline none --rounds 3 --calls 2000 --out "$ROWS" 2>&1 \
    | tee "$OUT/bench_overhead.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if wanted e2e; then
  stage "end to end"
  e2e_args=""
  [ "$QUICK" = "1" ] && e2e_args="--quick"
  # shellcheck disable=SC2086
  "$PY" benchmarks/bench_e2e.py --out "$ROWS" $e2e_args ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "$QUICK" != "1" ]; then
  for bench in bench_prune bench_train_step; do
    stage "$bench"
    "$PY" "benchmarks/$bench.py" --device cuda --out "$OUT" 2>&1 | tee "$OUT/$bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi

stage "goals"
"$PY" benchmarks/goals.py "$ROWS" 2>&1 | tee "$OUT/goals.txt"
echo "rows in $ROWS (copy to benchmarks/results/$GPU.jsonl), logs in $OUT; $(( $(date +%s) - start )) s in all"
exit $status
