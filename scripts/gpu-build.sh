#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh carries to a GPU machine, here (no GPU needed): the CUDA release binary with the
# fused attention kernels (`--features flash-attn`, which implies cuda) and the kernels crate's CUDA test binary (the
# kernels against candle's unfused ops), xz-compressed into target/gpu-bin (carry it: `carry: ["target/gpu-bin"]`,
# ~21 MB). From scratch ~40 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-env.sh)"
cargo build --release -p blipdex-cli --features flash-attn --target-dir target/cuda
tests=$(cargo test --features flash-attn -p blipdex-kernels --lib --no-run --target-dir target/cuda --message-format=json 2>/dev/null \
  | python3 -c "import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'blipdex_kernels':
        print(m['executable'])")
mkdir -p target/gpu-bin
xz -T0 -6 -c target/cuda/release/blipdex >target/gpu-bin/blipdex.xz
strip -o target/gpu-bin/kernels-tests "$tests"  # 370 MB of debug info otherwise
xz -T0 -6 -c target/gpu-bin/kernels-tests >target/gpu-bin/kernels-tests.xz
rm target/gpu-bin/kernels-tests
ls -l target/gpu-bin
