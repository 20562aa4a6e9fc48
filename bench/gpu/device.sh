#!/usr/bin/env bash
# Run THERE, in the last device call (see bench/gpu/README.md): joins the onnxruntime-gpu pieces
# that earlier calls left in /tmp/ortgpu (or that this call carried in .whl/ort), checks the
# wheel's sha256, installs it and lark into /tmp/site, checks that the CUDA provider loads and
# trains on it, and runs the benchmark against PyTorch on the same GPU. Everything it prints
# is also written to $OUT/gpu.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT" /tmp/ortgpu
exec > >(tee "$OUT/gpu.log") 2>&1
cp -n .whl/ort/part.* /tmp/ortgpu/ 2>/dev/null
ls -l /tmp/ortgpu
cat /tmp/ortgpu/part.* > "/tmp/$WHEEL"
(cd /tmp && sha256sum -c "$OLDPWD/bench/gpu/onnxruntime_gpu.sha256") || { echo "pieces missing or corrupt"; exit 3; }
[ "${1:-}" = "--check-only" ] && exit 0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "/tmp/$WHEEL" .whl/lark/*.whl || exit 4
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'PY'
import onnxruntime as ort, torch
from runtime.session import cuda_problem
print("onnxruntime", ort.__version__, ort.get_available_providers(), "| torch", torch.__version__, torch.cuda.is_available())
print("CUDA provider:", cuda_problem() or "loads")
PY
timeout 120 python3 -m runtime.cli run examples/digits_deep.dln -o /tmp/gpu-run --force --device cuda --quiet
timeout 420 python3 bench/run.py --device cuda --peers dlnc,torch --models mlp,lenet5,gru_char \
  --rounds 5 --max-rounds 7 --json "$OUT/bench.json"
