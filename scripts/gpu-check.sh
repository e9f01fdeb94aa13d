#!/usr/bin/env bash
# GPU check for a lent CUDA machine (x86-64, CUDA driver >= 13.0, PyTorch + transformers installed, no package
# registries, at most 64 MiB of tree carried). Ends well inside 10 minutes. Build the binary here first:
#
#   bash scripts/gpu-build.sh     # target/gpu-bin/blipdex.xz and kernels-tests.xz (the kernels crate's CUDA tests)
#
# then run `bash scripts/gpu-check.sh` there with target/gpu-bin carried. Steps, each with its own time limit, so
# one failure does not hide the others:
#   0. fused attention (the binary is built with --features flash-attn; BLIPDEX_CUDA_FLASH=1 here, 0 in every other
#      step, so that those measure the unfused path as before): the kernels against candle's unfused ops (the
#      CUDA test binary), the fixtures' parity with them on (parity-flash.json: f32 runs the Q-Former's kernel, f16 /
#      bf16 the vision tower's too), and embed b64 f16 / bf16 and ViT-g b32 f16 with and without them next to
#      transformers (bench.jsonl, labels "... flash" / "... unfused");
#   1. parity: `blipdex embed` of the fixtures' golden pixel values on CUDA in f32 / f16 / bf16 against transformers'
#      f32 golden tensors (f32: every output within 1e-4; f16 1e-3 and bf16 5e-3 on the ITC scores);
#   2. captions on CUDA in f32, token-exact against transformers (greedy, greedy with a prompt, 3-beam search);
#   3. speed next to transformers on the same GPU (scripts/bench/compare.py, base-size checkpoints made there):
#      embed batch 8 (+ a 20-token caption, + `blipdex ingest` of 96 photos) and 64 in f16, 64 in bf16; then the
#      real ViT-g shape (--vitg) in f16 and bf16. Embed rows carry the vision tower's time alone (--breakdown).
#      Between the base-size and ViT-g benches: a per-kernel time profile of blipdex's embed (ncu, where installed).
#   4. ingest: does the host's CPU feed the GPU? 3,000 generated 12 MP JPEGs (scripts/bench/make_photos.py) ingested
#      with ViT-g in f16, --decode exact and fast, next to the model alone (ingest.jsonl).
# Results: $OUT/gpu-check.log (everything), parity.json, captions.json, bench.jsonl (one compare.py result a line),
# ncu-embed.txt, ingest.jsonl.
# GPU_CHECK_DEVICE=cpu runs steps 1-2 on the CPU (a dry run of this script where no GPU is at hand).
# GPU_CHECK_STEPS picks steps (default "flash parity captions bench ncu vitg ingest"); "profile" (not in the default) times each
# op of one base-size f16 batch of 64 on both sides (blipdex --profile, torch.profiler with eager attention).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
step() { echo "== $* ($(date +%T))"; }
STEPS=" ${GPU_CHECK_STEPS:-flash parity captions bench ncu vitg ingest} "
want() { [[ $STEPS == *" $1 "* ]]; }
status=0

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
BIN=${BLIPDEX_BIN:-}
if [ -z "$BIN" ] && [ -f target/gpu-bin/blipdex.xz ]; then
  $PY -c "import lzma,shutil; shutil.copyfileobj(lzma.open('target/gpu-bin/blipdex.xz'), open('$WORK/blipdex','wb'))"
  chmod +x "$WORK/blipdex"
  BIN=$WORK/blipdex
fi
BIN=${BIN:-target/release/blipdex}
# cuBLAS, cudart, NVRTC and cuRAND 13 from PyTorch's wheels (the driver's libcuda comes from the system).
NVLIB=$($PY -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null || true)
export LD_LIBRARY_PATH=${NVLIB}:${LD_LIBRARY_PATH:-}
ldd "$BIN" | grep -E "not found|cuda|cublas|nvrtc|curand" || true
"$BIN" --version || { echo "blipdex does not run"; exit 1; }
# The fused attention kernels only where a step asks for them (BLIPDEX_CUDA_FLASH=1).
export BLIPDEX_CUDA_FLASH=0

# Embeds the fixtures' golden pixel values in each dtype and compares with transformers' f32 golden tensors:
# parity <json name> <dtype>... (writes $OUT/<json name>; 1 in status where a dtype is off).
parity() {
local name=$1; shift
for dtype in "$@"; do
  for m in itm-a itm-b; do
    texts=()
    while IFS= read -r t; do texts+=(--text "$t"); done < <($PY -c "import json;print('\n'.join(json.load(open('tests/fixtures/golden/$m.json'))['texts']))")
    timeout 120 "$BIN" embed --model "tests/fixtures/models/$m" --pixel-values "tests/fixtures/golden/$m.safetensors" \
      "${texts[@]}" --itm --device "$DEV" --dtype "$dtype" --output "$WORK/$m-$dtype.safetensors" || status=1
  done
done
$PY - "$WORK" "$OUT/$name" "$@" <<'PY' || status=1
import json, os, sys
from safetensors.numpy import load_file
work, out, dtypes = sys.argv[1], sys.argv[2], sys.argv[3:]
tol = {"f32": 1e-4, "f16": 1e-3, "bf16": 5e-3}
rows, ok = [], True
for dtype in dtypes:
    t = tol[dtype]
    for m in ["itm-a", "itm-b"]:
        path = f"{work}/{m}-{dtype}.safetensors"
        if not os.path.exists(path):
            rows.append({"model": m, "dtype": dtype, "pass": False, "error": "no output"})
            ok = False
            continue
        g, r = load_file(f"tests/fixtures/golden/{m}.safetensors"), load_file(path)
        diffs = {k: float(abs(g[k].astype("float64") - r[k].astype("float64")).max())
                 for k in ["vision_last_hidden_state", "qformer_last_hidden_state", "image_embeds", "text_embeds",
                           "itc_scores", "itm_logits"] if k in r and k in g}
        passed = "itc_scores" in diffs and diffs["itc_scores"] <= t and (dtype != "f32" or max(diffs.values()) <= t)
        ok &= passed
        rows.append({"model": m, "dtype": dtype, "tolerance": t, "max_abs_diff": diffs, "pass": passed})
for r in rows:
    print(json.dumps(r))
json.dump(rows, open(out, "w"), indent=1)
sys.exit(0 if ok else 1)
PY
}

if want flash && [ "$DEV" = cuda ]; then
step "0. flash attention (BLIPDEX_CUDA_FLASH=1)"
if [ -f target/gpu-bin/kernels-tests.xz ]; then
  $PY -c "import lzma,shutil; shutil.copyfileobj(lzma.open('target/gpu-bin/kernels-tests.xz'), open('$WORK/kernels-tests','wb'))"
  chmod +x "$WORK/kernels-tests"
  timeout 120 "$WORK/kernels-tests" cuda_flash --nocapture --test-threads 1 || status=1
else
  echo "no target/gpu-bin/kernels-tests.xz (scripts/gpu-build.sh makes it): kernel test skipped"; status=1
fi
BLIPDEX_CUDA_FLASH=1 parity parity-flash.json f32 f16 bf16
fi

if want parity; then
step "1. embed parity on $DEV"
parity parity.json f32 f16 bf16

if ! ls "$WORK"/*-f32.safetensors >/dev/null 2>&1; then
  echo "blipdex produced no f32 embeddings on $DEV: stopping here (see the errors above)"
  exit 1
fi
fi

if want captions; then
step "2. caption tokens on $DEV (f32)"
cap() { # name case extra-args...
  local name=$1 case=$2; shift 2
  timeout 120 "$BIN" caption --model "tests/fixtures/models/$name" --pixel-values "tests/fixtures/golden/$name.safetensors" \
    --device "$DEV" --dtype f32 --json "$@" >"$WORK/cap-$name-$case.jsonl" || status=1
}
cap caption-a greedy
cap caption-b greedy_prompt --prompt "Question: what is in the photo? Answer:" --max-new-tokens 10
cap caption-a beam --num-beams 3 --batch-size 2
$PY - "$WORK" "$OUT" <<'PY' || status=1
import json, sys
work, out = sys.argv[1:]
rows, ok = [], True
for name, case in [("caption-a", "greedy"), ("caption-b", "greedy_prompt"), ("caption-a", "beam")]:
    gold = next(c for c in json.load(open(f"tests/fixtures/golden/{name}.json"))["generation"] if c["name"] == case)
    try:
        got = [json.loads(l) for l in open(f"{work}/cap-{name}-{case}.jsonl") if l.strip()]
    except OSError:
        got = []
    same = 0
    for i, want in enumerate(gold["new_tokens"]):
        want = want[: want.index(2) + 1] if 2 in want else want  # up to and including EOS, as blipdex prints
        same += i < len(got) and got[i]["token_ids"] == want
    passed = len(got) == len(gold["new_tokens"]) and same == len(got)
    ok &= passed
    rows.append({"model": name, "case": case, "images": len(gold["new_tokens"]), "token_exact": same, "pass": passed})
    print(json.dumps(rows[-1]))
json.dump(rows, open(f"{out}/captions.json", "w"), indent=1)
sys.exit(0 if ok else 1)
PY
fi

if [ "$DEV" = cuda ]; then
  bench() { # label compare.py-args...
    local label=$1; shift
    step "3. bench $label"
    timeout "${BENCH_TIMEOUT:-150}" $PY scripts/bench/compare.py --blipdex "$BIN" --device cuda --threads 0 \
      --models "$WORK/bench-models" "$@" >"$WORK/bench.json" || { status=1; return; }
    # compare.py's last line is its result (checkpoint generation may print before it).
    $PY -c "import json,sys; r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); r['label']=sys.argv[2]; print(json.dumps(r))" \
      "$WORK/bench.json" "$label" | tee -a "$OUT/bench.jsonl"
  }
  if want profile; then
    step "profile tools"
    command -v ncu nsys || ls -d /usr/local/cuda*/bin 2>/dev/null || echo "no ncu/nsys"
    bench "f16 embed b64 profile (eager)" --dtype f16 --iters 5 --only embed --batch-size 64 --breakdown \
      --profile --torch-attn eager
    # The same with candle's own layout/bias/softmax kernels instead of blipdex's (cuda_kernels.rs).
    BLIPDEX_CUDA_KERNELS=0 timeout 120 "$BIN" bench embed --model "$WORK/bench-models/base-itm" --batch-size 64 \
      --iters 5 --device cuda --dtype f16 --breakdown --profile --json | tail -1 \
      | $PY -c "import json,sys; r=json.loads(sys.stdin.read()); r['label']='f16 b64 candle kernels'; print(json.dumps(r))" \
      | tee -a "$OUT/bench.jsonl"
  fi
  if want bench; then
  bench "f16 embed b8 + caption + ingest" --dtype f16 --iters 10 --breakdown
  bench "f16 embed b64" --dtype f16 --iters 10 --only embed --batch-size 64 --breakdown
  bench "bf16 embed b64" --dtype bf16 --iters 10 --only embed --batch-size 64 --breakdown
  fi
  if want flash; then
    # The issue's GPU target is transformers' eager attention; its default (SDPA) is in the rows above.
    bench "f16 embed b64 unfused" --dtype f16 --iters 10 --only embed --batch-size 64 --breakdown --torch-attn eager
    BLIPDEX_CUDA_FLASH=1 bench "f16 embed b64 flash" --dtype f16 --iters 10 --only embed --batch-size 64 --breakdown \
      --torch-attn eager
    BLIPDEX_CUDA_FLASH=1 bench "bf16 embed b64 flash" --dtype bf16 --iters 10 --only embed --batch-size 64 --breakdown
    BLIPDEX_CUDA_FLASH=1 BENCH_TIMEOUT=240 bench "ViT-g f16 embed b32 flash" --dtype f16 --iters 5 --only embed \
      --batch-size 32 --embed-model vitg-itm --breakdown
  fi
  # Where blipdex's GPU time goes: per-kernel durations (ncu, one metric: each kernel replayed once) for a
  #    base-size batch of 64, warm-up + one timed pass.
  if want ncu && command -v ncu >/dev/null; then
    step "3. per-kernel profile (ncu)"
    timeout 180 ncu --metrics gpu__time_duration.sum --print-summary per-kernel "$BIN" bench embed \
      --model "$WORK/bench-models/base-itm" --batch-size 64 --iters 1 --device cuda --dtype f16 --json \
      >"$OUT/ncu-embed.txt" 2>&1 || echo "ncu failed (see ncu-embed.txt)"
    grep -E "^  [A-Za-z_]|gpu__time_duration" "$OUT/ncu-embed.txt" | head -80
  fi
  if want vitg; then
  BENCH_TIMEOUT=240 bench "ViT-g f16 embed b32" --dtype f16 --iters 5 --only embed --batch-size 32 --embed-model vitg-itm --breakdown
  bench "ViT-g bf16 embed b32" --dtype bf16 --iters 5 --only embed --batch-size 32 --embed-model vitg-itm --breakdown
  fi
  # 4. Does the host feed the GPU? `blipdex ingest` of GPU_INGEST_PHOTOS generated 12 MP JPEGs (ViT-g, f16, batch
  #    32) with --decode exact and fast, against `bench embed` of the same model alone (ingest.jsonl).
  if want ingest; then
    step "4. ingest of 12 MP JPEGs vs the model alone"
    M=$WORK/bench-models/vitg-itm
    [ -d "$M" ] || timeout 240 $PY scripts/bench/make_checkpoints.py "$WORK/bench-models" --vitg >/dev/null || status=1
    timeout 180 $PY scripts/bench/make_photos.py --out "$WORK/photos12" --count "${GPU_INGEST_PHOTOS:-3000}" || status=1
    timeout 120 "$BIN" bench embed --model "$M" --batch-size 32 --iters 5 --device cuda --dtype f16 --json \
      | tail -1 >"$WORK/alone.json" || status=1
    for mode in exact fast; do
      rm -rf "$WORK/index-$mode"
      timeout 300 "$BIN" ingest --model "$M" --index "$WORK/index-$mode" --device cuda --dtype f16 --batch-size 32 \
        --decode "$mode" --progress none --json "$WORK/photos12" | tail -1 >"$WORK/ingest-$mode.json" || status=1
    done
    $PY - "$WORK" <<'PY' | tee -a "$OUT/ingest.jsonl"
import json, os, sys
w = sys.argv[1]
alone = json.load(open(f"{w}/alone.json"))["images_per_s"]
row = {"cores": os.cpu_count(), "model_alone_images_per_s": alone}
for mode in ("exact", "fast"):
    try:
        s = json.load(open(f"{w}/ingest-{mode}.json"))
    except (OSError, ValueError) as e:
        row[mode] = f"failed: {e}"
        continue
    row[mode] = {"images": s["indexed"], "images_per_s": s["images_per_s"], "of_model_alone": s["images_per_s"] / alone,
                 "decode": s["decode"], "model_seconds": s["model_seconds"], "seconds": s["seconds"]}
print(json.dumps(row))
PY
  fi
fi
step "done (status $status)"
rm -rf "$WORK"
exit $status
