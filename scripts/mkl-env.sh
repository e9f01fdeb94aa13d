#!/usr/bin/env bash
# Installs Intel MKL (static) and Intel OpenMP from PyPI into $MKL_PREFIX (default
# target/mkl-pip) and prints the MKLROOT to build with:
#
#   export MKLROOT=$(bash scripts/mkl-env.sh)
#   cargo build --release --features mkl
#
# candle's `mkl` feature (intel-mkl-src) finds the libraries through MKLROOT, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${MKL_PREFIX:-$PWD/target/mkl-pip}"
py="${PYTHON:-python3}"
if [ ! -f "$prefix/lib/libmkl_core.a" ]; then
  "$py" -m pip install --quiet --no-deps --prefix "$prefix" \
    mkl-static==2024.2.0 mkl-include==2024.2.0 intel-openmp==2024.2.0 >&2
fi
echo "$prefix"
