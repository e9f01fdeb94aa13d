#!/usr/bin/env bash
# GPU check for a lent CUDA machine (x86-64, CUDA, PyTorch + transformers installed, no package registries,
# at most 64 MiB of tree carried). Runs in well under 10 minutes:
#   1. finds a CUDA build of blipdex (BLIPDEX_BIN, target/release/blipdex built with --features cuda, or an offline
#      `cargo build --release --features cuda` when a cargo registry cache is present);
#   2. parity on CUDA: `blipdex embed` of the fixture checkpoints' golden pixel values in f32 / f16 / bf16, compared
#      with transformers' f32 golden tensors (stated tolerances below);
#   3. `scripts/bench/compare.py` on the base-size checkpoints, blipdex vs transformers on the same GPU (f16).
# Output: one JSON line per step, summary in $OUT/gpu-check.json when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

BIN=${BLIPDEX_BIN:-target/release/blipdex}
if ! "$BIN" embed --help >/dev/null 2>&1; then
  echo "building blipdex with CUDA (offline)..." >&2
  timeout 420 cargo build --release --offline -p blipdex-cli --features cuda
fi

# 1. Parity: vision, Q-Former, ITC/ITM on CUDA vs the f32 golden files (f32 1e-4; f16 / bf16 tolerances as on CPU:
#    ITC within 1e-3 / 5e-3).
for dtype in f32 f16 bf16; do
  for m in itm-a itm-b; do
    texts=()
    while IFS= read -r t; do texts+=(--text "$t"); done < <($PY -c "import json;print('\n'.join(json.load(open('tests/fixtures/golden/$m.json'))['texts']))")
    "$BIN" embed --model "tests/fixtures/models/$m" --pixel-values "tests/fixtures/golden/$m.safetensors" \
      "${texts[@]}" --itm --device cuda --dtype "$dtype" --output "$OUT/$m-$dtype.safetensors"
  done
done
$PY - "$OUT" <<'PY'
import json, sys
from safetensors.numpy import load_file
out = sys.argv[1]
tol = {"f32": 1e-4, "f16": 1e-3, "bf16": 5e-3}
rows, ok = [], True
for dtype, t in tol.items():
    for m in ["itm-a", "itm-b"]:
        g, r = load_file(f"tests/fixtures/golden/{m}.safetensors"), load_file(f"{out}/{m}-{dtype}.safetensors")
        diffs = {k: float(abs(g[k] - r[k]).max()) for k in ["image_embeds", "text_embeds", "itc_scores", "itm_logits"] if k in r}
        passed = diffs["itc_scores"] <= t and (dtype != "f32" or max(diffs.values()) <= t)
        ok &= passed
        rows.append({"model": m, "dtype": dtype, "tolerance": t, "max_abs_diff": diffs, "pass": passed})
        print(json.dumps(rows[-1]))
json.dump(rows, open(f"{out}/parity.json", "w"), indent=1)
sys.exit(0 if ok else 1)
PY

# 2. Speed next to transformers fp16 eager on the same GPU (base-size random checkpoints, built here).
$PY scripts/bench/compare.py --blipdex "$BIN" --device cuda --dtype f16 --threads 0 --iters 5 \
  --models "$OUT/bench-models" --only embed | tee "$OUT/bench-embed.json"
$PY scripts/bench/compare.py --blipdex "$BIN" --device cuda --dtype f16 --threads 0 --iters 3 \
  --models "$OUT/bench-models" --only caption | tee "$OUT/bench-caption.json"
