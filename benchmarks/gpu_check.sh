#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): run from anywhere on a machine whose python3
# has torch + triton + CUDA. Installs nothing; the repo is used in place (PYTHONPATH), not pip-installed.
# Writes $OUT/gpu_check.json (benchmarks/results/gpu_check.json when $OUT is unset) and prints a table.
#   bash benchmarks/gpu_check.sh                 # full check, ~5 min on an H100
#   bash benchmarks/gpu_check.sh --no-compile    # skip the torch.compile variant
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv || true
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
# The CUDA-only kernel tests (skipped in CI); a failure here is reported, not fatal.
timeout 90 "$PYTHON" -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py -k cuda 2>&1 | tail -5
echo "pytest tests/test_kernels.py -k cuda: exit ${PIPESTATUS[0]}"
timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
