#!/usr/bin/env python3
"""blipdex vs transformers on the same base-size checkpoints, machine and thread count (f32 unless --dtype).

    python3 scripts/bench/compare.py --blipdex target/release/blipdex [--threads 2] [--device cpu|cuda]
        [--dtype f32|f16|bf16] [--models target/bench-models] [--iters 3]

Runs scripts/bench/make_checkpoints.py if needed. Embed: vision + Q-Former + ITC projection on random pixels,
batch 8, one warm-up, best of --iters. Caption: batch 1, greedy, exactly 20 new tokens (EOS forbidden until then),
vision + Q-Former + OPT included. Prints one JSON object with both sides, peak memory and the ratios.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

HERE = Path(__file__).resolve().parent


def best_of(iters, fn, sync):
    fn()
    sync()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def peak_mib(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def torch_embed(path, args, dtype, sync):
    model = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=dtype).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    px = (torch.rand((8, 3, 224, 224), generator=g) * 4 - 2).to(args.device, dtype)

    @torch.inference_mode()
    def run():
        vision = model.vision_model(pixel_values=px).last_hidden_state
        q = model.query_tokens.expand(vision.shape[0], -1, -1)
        mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        out = model.qformer(query_embeds=q, encoder_hidden_states=vision, encoder_attention_mask=mask).last_hidden_state
        return F.normalize(model.vision_projection(out.to(model.vision_projection.weight.dtype)), dim=-1)

    best = best_of(args.iters, run, sync)
    return {"images_per_s": 8 / best, "best_batch_s": best, "peak_mib": peak_mib(args.device)}


def torch_caption(path, args, dtype, sync):
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    px = (torch.rand((1, 3, 224, 224), generator=g) * 4 - 2).to(args.device, dtype)
    n = args.new_tokens

    @torch.inference_mode()
    def run():
        out = model.generate(pixel_values=px, max_new_tokens=n, min_new_tokens=n, num_beams=1, do_sample=False)
        assert out.shape[-1] >= n, out.shape

    best = best_of(args.iters, run, sync)
    return {"tokens_per_s": n / best, "captions_per_s": 1 / best, "peak_mib": peak_mib(args.device)}


def blipdex(args, kind, model):
    cmd = [args.blipdex, "bench", kind, "--model", str(model), "--iters", str(args.iters), "--device",
           args.device if args.device == "cpu" else "cuda:0", "--dtype", args.dtype, "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--batch-size", "8"] if kind == "embed" else ["--max-new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def make_photos(out: Path, n: int):
    """n distinct camera-sized JPEGs (1600x1200, quality 90) cut from the fixture photos."""
    from PIL import Image
    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.glob("*.jpg"))) >= n:
        return
    srcs = [Image.open(p).convert("RGB") for p in sorted((HERE.parents[1] / "tests/fixtures/photos").iterdir())]
    for i in range(n):
        img = srcs[i % len(srcs)]
        w, h = img.size
        box = (i % 7, i % 5, w - (i % 11), h - (i % 3))
        img.crop(box).resize((1600, 1200), Image.BICUBIC).save(out / f"photo_{i:04d}.jpg", quality=90)


def ingest_overhead(args, models: Path):
    """End-to-end `blipdex ingest` (walk, read, hash, decode, resize, model, Parquet + HNSW commit) against
    `blipdex bench embed` on the same checkpoint and batch size."""
    import shutil
    import tempfile
    photos = models / "photos"
    make_photos(photos, args.photos)
    model = models / "base-itm"
    alone = blipdex(args, "embed", model)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.blipdex, "ingest", "--model", str(model), "--index", str(Path(tmp) / "index"),
               "--batch-size", "8", "--dtype", args.dtype, "--json", str(photos)]
        env = dict(os.environ)
        if args.threads:
            env["RAYON_NUM_THREADS"] = str(args.threads)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        summary = json.loads(out.strip().splitlines()[-1])
        shutil.rmtree(Path(tmp) / "index", ignore_errors=True)
    return {
        "photos": args.photos,
        "ingest": summary,
        "model_alone_images_per_s": alone["images_per_s"],
        "ingest_images_per_s": summary["images_per_s"],
        "pipeline_overhead": alone["images_per_s"] / summary["images_per_s"] - 1,
        "time_outside_model": 1 - summary["model_seconds"] / summary["seconds"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blipdex", default="target/release/blipdex")
    ap.add_argument("--models", default=str(HERE.parents[1] / "target" / "bench-models"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--only", choices=["embed", "caption", "ingest"])
    ap.add_argument("--photos", type=int, default=96, help="JPEGs for the ingest benchmark")
    args = ap.parse_args()
    models = Path(args.models)
    if not (models / "base-caption" / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_checkpoints.py"), str(models)], check=True)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "threads": args.threads, "dtype": args.dtype, "torch": torch.__version__}
    import transformers
    result["transformers"] = transformers.__version__
    if args.only in (None, "embed"):
        b = blipdex(args, "embed", models / "base-itm")
        t = torch_embed(models / "base-itm", args, dtype, sync)
        result["embed"] = {"blipdex": b, "torch": t, "ratio": b["images_per_s"] / t["images_per_s"]}
        print(json.dumps(result["embed"]), file=sys.stderr)
    if args.only in (None, "caption"):
        b = blipdex(args, "caption", models / "base-caption")
        t = torch_caption(models / "base-caption", args, dtype, sync)
        result["caption"] = {"blipdex": b, "torch": t, "ratio": b["tokens_per_s"] / t["tokens_per_s"]}
        print(json.dumps(result["caption"]), file=sys.stderr)
    if args.only in (None, "ingest"):
        result["ingest"] = ingest_overhead(args, models)
        print(json.dumps(result["ingest"]), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
