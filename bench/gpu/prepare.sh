#!/usr/bin/env bash
# Run HERE (the development machine, which can reach the package registries) before a session's
# device calls: downloads what the GPU machine lacks into .whl/ (git-ignored) and cuts the
# 255 MB onnxruntime-gpu wheel into pieces that each fit one device call (64 MiB per call,
# working tree included). See bench/gpu/README.md for the call sequence.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEEL=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64)
mkdir -p .whl/ort .whl/lark
if [ ! -f ".whl/$WHEEL" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl onnxruntime-gpu==1.31.1
fi
(cd .whl && sha256sum -c ../bench/gpu/onnxruntime_gpu.sha256)
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl/lark "lark>=1.1.9"
rm -f .whl/ort/part.*
split -b 56M -d -a 2 ".whl/$WHEEL" .whl/ort/part.
ls -l .whl/ort .whl/lark
