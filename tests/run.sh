#!/usr/bin/env bash
# The test command (README and .ci/run call exactly this). Two pytest processes:
#  1. the plain tier (everything but the Triton-interpreter tests; GPU tests skip without CUDA),
#  2. the Triton-interpreter tier with TRITON_INTERPRET=1 set before any kernel import.
# Either tier collecting no tests (pytest exit code 5) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m pytest -q -m "not interpret" "$@"
TRITON_INTERPRET=1 "$PY" -m pytest -q -m interpret "$@"
