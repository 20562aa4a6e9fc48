#!/usr/bin/env bash
# The peers' virtual environments for bench/run.py, kept outside the project's dependencies:
#   JAX                     -> ${BENCH_VENVS:-/work/venvs}/jax   (about 620 MB)
#   onnxruntime-training    -> ${BENCH_VENVS:-/work/venvs}/ortt  (with torch, about 1 GB)
# dlnc and PyTorch eager run in the project's own environment (`pip install '.[test]'`).
# bench/run.py finds the peers there, or at $BENCH_JAX_PYTHON and $BENCH_ORTT_PYTHON; a peer
# that is missing is reported as "not installed" in the table.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venvs="${BENCH_VENVS:-/work/venvs}"
python="${PYTHON:-python3}"
mkdir -p "$venvs"
for peer in jax ortt; do
  if [ ! -x "$venvs/$peer/bin/python" ]; then
    "$python" -m venv "$venvs/$peer"
  fi
  "$venvs/$peer/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-$peer.txt"
done
"$venvs/jax/bin/python" -c "import jax; print('jax', jax.__version__, jax.devices())"
"$venvs/ortt/bin/python" -c "import onnxruntime, onnxruntime.training.api; print('onnxruntime-training', onnxruntime.__version__)"
