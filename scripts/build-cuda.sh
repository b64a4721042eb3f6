#!/usr/bin/env bash
# Builds the CUDA binary on a CPU-only machine (no GPU, no driver needed at build time).
#
# CUDA 13's compiler comes from pinned Python wheels (unpinned nvvm 13.5 fails in ptxas).
# The result, dist/idiff-studio-cuda (and its gzip, dist/idiff-studio-cuda.gz, the copy to
# carry), is what scripts/gpu-check.sh runs on a GPU machine that has the CUDA 13 driver and
# libraries (cuBLAS, cuBLASLt, cuRAND, NVRTC, cudart) but no package registry.
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
# Libraries the binary links against (candle's cudarc uses dynamic linking): cuBLAS(Lt),
# cuRAND and NVRTC from wheels, linked by SONAME (libcublas.so.13, ...); the GPU machine's
# own copies are loaded at run time.
"$VENV/bin/pip" install -q nvidia-cublas==13.10.0.20 nvidia-curand==10.4.5.25 \
  nvidia-cuda-nvrtc==13.4.92
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
export CUDA_HOME="$SITE/nvidia/cu13"
LIB="$CUDA_HOME/lib"
for so in "$LIB"/lib{cublas,cublasLt,curand,nvrtc,cudart}.so.*[0-9]; do
  [[ -e "$so" ]] && ln -sf "$(basename "$so")" "${so%%.so.*}.so"
done
# The driver (libcuda.so.1) comes with the GPU's kernel driver, never with a toolkit wheel.
# Link against a stub with the same SONAME that defines every driver entry point cudarc
# declares (what the CUDA toolkit's lib/stubs/libcuda.so is); the real driver replaces it at
# run time. The stub never travels: nothing sets an rpath to this folder.
cargo fetch --locked -q
if [[ ! -e "$LIB/libcuda.so" ]]; then
  src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -1)"
  grep -o 'fn cu[A-Za-z0-9_]*' "$src" | sort -u | sed 's/^fn \(.*\)/void \1(void) {}/' > "$LIB/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LIB/libcuda.so" "$LIB/cuda_stub.c"
fi
export CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="$CAP"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
cargo build --release --features cuda --bin idiff-studio
mkdir -p dist
cp "$CARGO_TARGET_DIR/release/idiff-studio" dist/idiff-studio-cuda
strip dist/idiff-studio-cuda || true
# The binary carries candle's PTX kernels (~98 MB); compressed it travels under 64 MiB.
gzip -9 -c dist/idiff-studio-cuda > dist/idiff-studio-cuda.gz
ls -lh dist/idiff-studio-cuda dist/idiff-studio-cuda.gz
# Smoke test here, without a GPU: the binary loads (the stub stands in for the driver) and
# runs a CPU forward pass.
smoke="$(mktemp -d)"
ln -s "$LIB/libcuda.so" "$smoke/libcuda.so.1"
LD_LIBRARY_PATH="$smoke:$LIB" dist/idiff-studio-cuda bench --device cpu --configs fixture \
  --batches 1 --repeats 1 --ddim-steps 0
rm -rf "$smoke"
