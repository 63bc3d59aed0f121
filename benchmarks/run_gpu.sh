#!/usr/bin/env bash
# Checked (on CPU, without a GPU) against the lent H100's stack: python3, torch 2.11.0+cu130, triton 3.6.0,
# transformers 5.17.0, accelerate 1.15.0, numpy 2.5 (no pip there); and against CI's torch 2.13 / triton 3.9 /
# transformers 5.24. Every launcher config compiles for sm_90 with both Tritons.
# The whole GPU tier in one call (for a session with a lent GPU):
#   1. the GPU tests (pytest -m gpu),
#   2. every benchmark (benchmarks/bench_*.py, each called with --out FILE),
#   3. a short table of the key ratios, printed last.
# Rows and logs go under $OUT (default: benchmarks/results/gpu-run-<date>); copy the .jsonl rows into
# benchmarks/results/ afterwards. Runs from a plain checkout (PYTHONPATH, no install needed).
# Options: QUICK=1 (fewer shapes / token counts), PYTHON=... (default python3, else python),
# BENCH_ARGS="..." (extra bench_linear args),
# BENCH_BUDGET=seconds for bench_linear (default 420: the whole script fits a 10-minute call; it prints
# which combinations it did not reach, to be run in a second call with BENCH_ARGS="--shapes ...").
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-$ROOT/benchmarks/results/gpu-run-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
status=0

echo "== environment" | tee "$OUT/env.txt"
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

echo "== GPU tests"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 0 ] || status=1

QUICK_ARG=""
[ "${QUICK:-0}" = "1" ] && QUICK_ARG="--quick"
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  echo "== $name"
  # bench_linear appends to a file; bench_prune / bench_train_step write <kind>-<device>.jsonl into a folder
  out="$OUT"
  extra=""
  if [ "$name" = "bench_linear" ]; then
    out="$OUT/$name.jsonl"
    extra="$QUICK_ARG --time-budget ${BENCH_BUDGET:-420} ${BENCH_ARGS:-}"
  fi
  # shellcheck disable=SC2086
  BENCH_ALLOW_ERRORS=1 "$PY" "$bench" --out "$out" $extra 2>&1 | tee "$OUT/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

echo "== summary (speedup = dense ms / provider ms, same run)"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
rows = []
for f in sorted(p for p in Path(sys.argv[1]).glob("*.jsonl") if p.is_file()):
    rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
lin = [r for r in rows if r.get("bench") == "linear" and r.get("ms")]
if not lin:
    print("no benchmark rows")
    sys.exit(0)
print(f"device: {lin[0]['device']}  torch {lin[0]['torch']}  triton {lin[0]['triton']}  commit {lin[0]['commit']}")
print(f"{'case':13s} {'provider':14s} {'shape':13s} {'dtype':5s} " + " ".join(f"M={t:<6d}" for t in (1, 16, 128, 576, 2048, 8192)))
keys = sorted({(r["case"], r["provider"], r["shape"], r["dtype"]) for r in lin if r["provider"] != "dense"})
for case, prov, shape, dtype in keys:
    cells = []
    for t in (1, 16, 128, 576, 2048, 8192):
        hit = [r for r in lin if (r["case"], r["provider"], r["shape"], r["dtype"], r["tokens"]) == (case, prov, shape, dtype, t)]
        cells.append(f"x{hit[-1]['speedup']:<7.2f}" if hit and hit[-1].get("speedup") else "-" * 8)
    print(f"{case:13s} {prov:14s} {shape:13s} {dtype:5s} " + " ".join(cells))
def best(case, prov, shape, toks):
    s = [r["speedup"] for r in lin if r["case"] == case and r["provider"] == prov and r["shape"] == shape
         and r["tokens"] in toks and r.get("speedup")]
    return min(s) if s else None
print("targets:")
for label, val, goal in [
    ("decode M<=16 packed 2:4 Triton, 4096x11008 (worst of fp16/bf16, M=1/16)", best("fwd", "triton24", "llava7b-up", (1, 16)), 1.5),
    ("prefill M>=2048 torch semi-structured, 4096x11008", best("fwd", "torch24", "llava7b-up", (2048, 8192)), 1.2),
]:
    shown = f"x{val:.2f}" if val is not None else "missing"
    print(f"  {label}: {shown} (target >= x{goal})")
PYEOF
echo "tests rc=$tests_rc; rows and logs in $OUT"
exit $status
