#!/usr/bin/env bash
# The GPU checks, in one run on a machine with a CUDA GPU (CI has none; see benchmarks/README.md):
#   1. the GPU-only tests (skipped without a GPU) and the unit tests, with a GPU present;
#   2. serving end to end on the GPU: examples in, answers agreeing with the CPU's, req/s side by side
#      (benchmarks/gpu_serving.py).
# Packages the machine lacks may lie as wheels in .whl/ (installed into /tmp/site first).
# Results go to $OUT (default benchmarks/results/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  [ -x .whl/hey ] && export PATH=$PWD/.whl:$PATH
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
timeout 330 $PY -m pytest -q -p no:cacheprovider -rs -n 8 --dist loadfile \
  tests/unit tests/e2e/test_instance_thread.py tests/e2e/test_examples_digits.py \
  tests/e2e/test_rest_inference.py tests/e2e/test_monitoring.py 2>&1 | tee "$OUT/pytest.log" | tail -40
echo "pytest exit ${PIPESTATUS[0]}"
timeout 150 $PY -m benchmarks.gpu_serving --seconds 6 --out "$OUT/gpu_serving.json" 2>&1 | tee "$OUT/gpu_serving.log" | tail -12
echo "gpu_serving exit ${PIPESTATUS[0]}"
