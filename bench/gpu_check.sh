#!/usr/bin/env bash
# On a GPU machine (python3 with torch, triton, transformers, pytest and tinygen's other requirements; no network,
# no .venv, no default weights needed): the CUDA and Triton tests with the kernels compiled for real, then
# bench/bench_gpu.py -> bench/results/gpu_<gpu name>.md and .json. Within 8 minutes: tests at most 3, bench at most 5.
#   bash bench/gpu_check.sh            (or: make gpu-check)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
unset TRITON_INTERPRET  # compile the kernels; the interpreter is for machines without a GPU
mkdir -p bench/results

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1

echo "== tests: -k 'cuda or triton' =="
timeout 180 $PY -m pytest -q -k "cuda or triton" tests 2>&1 | tee bench/results/gpu_check_tests.log
tests_rc=${PIPESTATUS[0]}

echo "== bench/bench_gpu.py =="
timeout 300 $PY bench/bench_gpu.py --max-seconds 220
bench_rc=$?

echo "tests exit $tests_rc, bench exit $bench_rc (124: cut off by the time limit; rows done so far are kept)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
