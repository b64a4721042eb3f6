#!/usr/bin/env bash
# Builds the CUDA binary on a CPU-only machine (no GPU, no driver needed at build time).
#
# CUDA 13's compiler comes from pinned Python wheels (unpinned nvvm 13.5 fails in ptxas).
# The result, dist/idiff-studio-cuda, is what scripts/gpu-check.sh runs on a GPU machine
# that has the CUDA driver and libraries but no package registry.
#
#   scripts/build-cuda.sh [COMPUTE_CAP]     # default 90 (H100/H200); 80 for A100
set -euo pipefail
cd "$(dirname "$0")/.."
CAP="${1:-90}"
VENV="${CUDA_VENV:-$HOME/.cache/idiff-studio/cuda-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.4.92 nvidia-cuda-runtime==13.4.92 \
    nvidia-cuda-cccl==13.3.5.0.6 "nvidia-nvvm==13.4.*" "nvidia-cuda-crt==13.4.*"
fi
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
export CUDA_HOME="$SITE/nvidia/cu13"
export CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="$CAP"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
cargo build --release --features cuda --bin idiff-studio
mkdir -p dist
cp "$CARGO_TARGET_DIR/release/idiff-studio" dist/idiff-studio-cuda
strip dist/idiff-studio-cuda || true
ls -lh dist/idiff-studio-cuda
