#!/usr/bin/env bash
# Run THERE, in the last device call (see bench/gpu/README.md): joins the onnxruntime-gpu pieces
# that earlier calls left in /tmp/ortgpu (or that this call carried in .whl/ort), checks the
# wheel's sha256, installs it in place of the image's CPU onnxruntime, checks that the CUDA
# provider loads, then runs the parts named (all by default): `run` trains an example on the GPU,
# `bench` runs the benchmark against PyTorch (and JAX) on the same GPU, `tests` the CUDA tests,
# `ab` the step's A/B, `profile` the step's profile. Everything it prints is also written to
# $OUT/gpu.log; the benchmark's JSON to $OUT/bench.json.
#   bash bench/gpu/device.sh [--check-only | PART...]
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
section() { echo; echo "=== $* ($(date +%T))"; }
PARTS=" ${*:-run bench tests ab profile} "
part() { [[ "$PARTS" == *" $1 "* ]]; }

section "install"
# as a user's pip would: onnxruntime-gpu in place of onnxruntime, in the site-packages that also
# holds the nvidia-* CUDA 13 wheels PyTorch brought (where onnxruntime.preload_dlls looks)
python3 -m pip uninstall -y -q onnxruntime
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "/tmp/$WHEEL" .whl/lark/*.whl || exit 4
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
probe() {
  python3 - <<'PY'
import onnxruntime as ort
from runtime.session import cuda_problem
print("onnxruntime", ort.__version__, ort.get_available_providers())
problem = cuda_problem()
print("CUDA provider:", problem or "loads")
raise SystemExit(problem is not None)
PY
}
if ! probe; then
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ls "$site/nvidia"
  LD_LIBRARY_PATH=$(find "$site/nvidia" -maxdepth 3 -type d -name lib | paste -sd:):${LD_LIBRARY_PATH:-}
  export LD_LIBRARY_PATH
  echo "preload_dlls did not find them; with LD_LIBRARY_PATH=$LD_LIBRARY_PATH:"
  probe || echo "the CUDA provider does not load: the runs below fall back to the CPU"
fi

if part run; then
section "dlnc run examples/digits_deep.dln --device cuda"
time timeout 90 python3 -m runtime.cli run examples/digits_deep.dln -o /tmp/gpu-run --force \
  --device cuda --json > "$OUT/digits_deep.json"
python3 -c "import json; r = json.load(open('$OUT/digits_deep.json')); print({s: round(1 - v['error'], 4) for s, v in r['splits'].items()})"
fi

part bench && section "benchmark: dlnc, PyTorch eager and JAX on the GPU" &&
BENCH_JAX_PYTHON=$(command -v python3) timeout 270 python3 bench/run.py --device cuda --peers dlnc,torch,jax \
  --models mlp,lenet5,gru_char --rounds 5 --max-rounds 5 --json "$OUT/bench.json"

part tests && section "tests/test_cuda.py" &&
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25

part ab && section "A/B of the step's variants on the GPU" &&
timeout 60 python3 bench/gpu/ab_step.py --device cuda --rounds 5 --seconds 0.3
part profile && section "where the step's time goes on the GPU" &&
timeout 120 python3 bench/gpu/profile_step.py --device cuda --out /tmp/profiles
section "done"
