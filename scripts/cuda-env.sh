#!/usr/bin/env bash
# Makes a CUDA 13.0 build root from NVIDIA's PyPI wheels (nvcc, headers, CCCL, cudart, cuBLAS, cuRAND, NVRTC) in
# $CUDA_PREFIX (default target/cuda-pip/x/nvidia/cu13), for building `--features cuda` on a machine with no CUDA
# toolkit and no GPU (the binary then runs on any machine whose driver supports CUDA >= 13.0):
#
#   eval "$(bash scripts/cuda-env.sh)"
#   cargo build --release -p blipdex-cli --features cuda
#
# cudarc links libcuda dynamically; the driver is not on PyPI, so a stub libcuda.so (soname libcuda.so.1) is made
# from the driver API names cudarc binds. At run time the real driver's libcuda.so.1 is used, and cuBLAS / cudart /
# NVRTC / cuRAND come from the machine (e.g. PyTorch's nvidia/cu13/lib; scripts/gpu-check.sh sets LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
dl="${CUDA_PIP_DIR:-$PWD/target/cuda-pip}"
root="${CUDA_PREFIX:-$dl/x/nvidia/cu13}"
py="${PYTHON:-python3}"
if [ ! -x "$root/bin/nvcc" ]; then
  mkdir -p "$dl"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dl" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 \
    nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 >&2
  for w in "$dl"/*.whl; do unzip -q -o "$w" -d "$dl/x"; done
  rm -f "$dl"/*.whl
fi
lib="$root/lib"
for so in cudart cublas cublasLt nvrtc curand; do
  real=$(ls "$lib"/lib$so.so.* | head -1)
  ln -sf "$(basename "$real")" "$lib/lib$so.so"
done
if [ ! -f "$lib/libcuda.so" ]; then
  # The stub's names come from cudarc's sources: on a fresh machine cargo has not fetched them yet.
  ls -d ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs >/dev/null 2>&1 || cargo fetch >&2
  src=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src" | sed -E 's/^pub unsafe fn (.*)/void \1(void) {}/' | sort -u \
    >"$dl/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$dl/libcuda-stub.c"
fi
echo "export CUDA_HOME='$root' CUDA_PATH='$root' CUDA_ROOT='$root' PATH='$root/bin':\"\$PATH\""
echo "export CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
echo "export LIBRARY_PATH='$lib':\"\${LIBRARY_PATH:-}\""
