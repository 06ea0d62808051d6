#!/usr/bin/env bash
# On a GPU machine (python3 with torch, triton, transformers, pytest and tinygen's other requirements; no network,
# no .venv, no default weights needed): the CUDA and Triton tests with the kernels compiled for real, then
# bench/bench_gpu.py -> bench/results/gpu_<gpu name>.md and .json, then bench/bench_gpu_batch.py (batches of full and
# auto on the 1B shape) -> bench/results/gpu_batch_<gpu name>.md and .json. Within 8.5 minutes: tests at most 3,
# bench_gpu at most 3 1/3 (it stops starting rows at 150 s), bench_gpu_batch at most 2 1/6 (it skips or cuts rows at
# 110 s, build and warm-up included).
#   bash bench/gpu_check.sh            (or: make gpu-check)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
unset TRITON_INTERPRET  # compile the kernels; the interpreter is for machines without a GPU
mkdir -p bench/results

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); assert torch.cuda.is_available(), 'no CUDA GPU'" || exit 1

echo "== tests: -k 'cuda or triton or kernel_path or graphs' =="
timeout 180 $PY -m pytest -q -k "cuda or triton or kernel_path or graphs" tests 2>&1 | tee bench/results/gpu_check_tests.log
tests_rc=${PIPESTATUS[0]}

echo "== bench/bench_gpu.py =="
timeout 200 $PY bench/bench_gpu.py --max-seconds 150
bench_rc=$?

echo "== bench/bench_gpu_batch.py =="
timeout 130 $PY bench/bench_gpu_batch.py --max-seconds 110
batch_rc=$?

echo "tests exit $tests_rc, bench exit $bench_rc, batch bench exit $batch_rc (124: cut off by the time limit; rows" \
     "done so far are kept)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$batch_rc" -eq 0 ]
