#!/usr/bin/env bash
# One-shot CUDA check of mmbalance, about 10 minutes on one H100 / H200: the gpu tests (with the
# contract tests over every method on CUDA), the paper-model cost tables in fp32 and bf16, CGGM on
# two CUDA streams, the synthetic matrix on the GPU against the CPU, and a determinism check.
# Everything goes to results/gpu/<device>/ (README.md, summary.json, raw JSON and logs).
#
#   benchmarks/cuda_check.sh                  # the full check on the first CUDA device
#   benchmarks/cuda_check.sh --dry-run        # the same stages on the CPU, tiny sizes, temporary folder
#   DEVICE=cpu benchmarks/cuda_check.sh       # the same as --dry-run
#   benchmarks/cuda_check.sh --stages bench   # some stages only (env,bench,tests,matrix,determinism,report)
#
# Running it again completes what a previous run left out (finished parts are kept); --budget-s
# bounds the wall time (default 570 s). Python: $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
args=("$@")
if [[ "${DEVICE:-cuda}" == "cpu" ]]; then
    args=(--dry-run "${args[@]}")
elif [[ "${DEVICE:-cuda}" != "cuda" ]]; then
    echo "cuda_check.sh: DEVICE must be cuda or cpu, got '${DEVICE}'" >&2
    exit 2
fi
exec "$PYTHON" benchmarks/cuda_check.py "${args[@]}"
