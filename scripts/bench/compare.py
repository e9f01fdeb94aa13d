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
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

HERE = Path(__file__).resolve().parent


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


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


class GpuPeak:
    """Peak device memory of one side (nvidia-smi's per-process figure, CUDA context included, every 20 ms):
    this process (PyTorch) with mine=True, else every other process (the blipdex child)."""

    def __init__(self, device, mine=False):
        self.on, self.mine, self.peak, self.stop = device == "cuda", mine, 0.0, threading.Event()

    def _poll(self):
        me = os.getpid()
        while not self.stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            used = 0.0
            for line in out.splitlines():
                try:
                    pid, mib = (int(float(x)) for x in line.split(","))
                except ValueError:
                    continue
                used += mib if (pid == me) == self.mine else 0
            self.peak = max(self.peak, used)
            self.stop.wait(0.02)

    def __enter__(self):
        if self.on:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.on:
            self.stop.set()
            self.thread.join()

    def put(self, result):
        if self.on:
            result["gpu_peak_used_mib"] = self.peak
        return result


def attn(args):
    return {} if args.torch_attn == "default" else {"attn_implementation": args.torch_attn}


def fresh(device):
    if device == "cuda":
        import gc
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def torch_embed(path, args, dtype, sync):
    fresh(args.device)
    model = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=dtype, **attn(args)).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    n, size = args.batch_size, model.config.vision_config.image_size
    px = (torch.rand((n, 3, size, size), generator=g) * 4 - 2).to(args.device, dtype)

    @torch.inference_mode()
    def run():
        vision = model.vision_model(pixel_values=px).last_hidden_state
        q = model.query_tokens.expand(vision.shape[0], -1, -1)
        mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        out = model.qformer(query_embeds=q, encoder_hidden_states=vision, encoder_attention_mask=mask).last_hidden_state
        return F.normalize(model.vision_projection(out.to(model.vision_projection.weight.dtype)), dim=-1)

    best = best_of(args.iters, run, sync)
    out = {"images_per_s": n / best, "best_batch_s": best, "peak_mib": peak_mib(args.device)}
    if args.breakdown:
        with torch.inference_mode():
            out["vision_s"] = best_of(args.iters, lambda: model.vision_model(pixel_values=px), sync)
    if args.profile:
        out["profile_ms"] = torch_profile(run, sync)
    return out


def torch_profile(run, sync):
    """Device time per aten op over one pass (torch.profiler), the counterpart of blipdex's --profile;
    the per-kernel table goes to stderr."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        run()
        sync()
    events = prof.key_averages()
    dev_ms = lambda e: (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) / 1e3
    print(events.table(sort_by="self_cuda_time_total" if acts[1:] else "self_cpu_time_total", row_limit=30),
          file=sys.stderr)
    rows = sorted(((e.key, dev_ms(e), e.count) for e in events if e.key.startswith("aten::") and dev_ms(e) > 0),
                  key=lambda r: -r[1])
    return rows[:20]


def torch_caption(path, args, dtype, sync):
    fresh(args.device)
    model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype, **attn(args)).to(args.device).eval()
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
    if args.breakdown and kind == "embed":
        cmd += ["--breakdown"]
    if args.profile and kind == "embed":
        cmd += ["--profile"]
    cmd += ["--batch-size", str(args.batch_size)] if kind == "embed" else ["--max-new-tokens", str(args.new_tokens)]
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
               "--batch-size", str(args.batch_size), "--device", args.device if args.device == "cpu" else "cuda:0",
               "--dtype", args.dtype, "--json", str(photos)]
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
    ap.add_argument("--batch-size", type=int, default=8, help="embed batch")
    ap.add_argument("--breakdown", action="store_true", help="embed: also time the vision tower alone")
    ap.add_argument("--profile", action="store_true",
                    help="embed: per-op device time of one pass on both sides (blipdex --profile, torch.profiler)")
    ap.add_argument("--embed-model", default="base-itm", help="checkpoint under --models for embed (vitg-itm: --vitg)")
    ap.add_argument("--torch-attn", default="default", choices=["default", "eager", "sdpa"],
                    help="transformers' attn_implementation (default: its own choice)")
    ap.add_argument("--photos", type=int, default=96, help="JPEGs for the ingest benchmark")
    args = ap.parse_args()
    models = Path(args.models)
    vitg = ["--vitg"] if args.embed_model == "vitg-itm" else []
    if not (models / "base-caption" / "config.json").is_file() or not (models / args.embed_model).is_dir():
        subprocess.run([sys.executable, str(HERE / "make_checkpoints.py"), str(models)] + vitg, check=True)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "threads": args.threads, "dtype": args.dtype, "torch": torch.__version__,
              "torch_attn": args.torch_attn, "cpu": cpu_model(),
              # What each side may use: PyTorch's kernels (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA)
              # and MKL (MKL_ENABLE_INSTRUCTIONS) can be capped, e.g. at AVX2 to stand for an AVX2-only CPU;
              # blipdex's GEMM and vector loops follow BLIPDEX_CPU_GEMM (= --cpu-gemm).
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "isa_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                     "MKL_ENABLE_INSTRUCTIONS", "BLIPDEX_CPU_GEMM")
                          if k in os.environ}}
    import transformers
    result["transformers"] = transformers.__version__
    if args.only in (None, "embed"):
        with GpuPeak(args.device) as m:
            b = m.put(blipdex(args, "embed", models / args.embed_model))
        with GpuPeak(args.device, mine=True) as m:
            t = m.put(torch_embed(models / args.embed_model, args, dtype, sync))
        result["embed"] = {"blipdex": b, "torch": t, "ratio": b["images_per_s"] / t["images_per_s"]}
        print(json.dumps(result["embed"]), file=sys.stderr)
    if args.only in (None, "caption"):
        with GpuPeak(args.device) as m:
            b = m.put(blipdex(args, "caption", models / "base-caption"))
        with GpuPeak(args.device, mine=True) as m:
            t = m.put(torch_caption(models / "base-caption", args, dtype, sync))
        result["caption"] = {"blipdex": b, "torch": t, "ratio": b["tokens_per_s"] / t["tokens_per_s"]}
        print(json.dumps(result["caption"]), file=sys.stderr)
    if args.only in (None, "ingest"):
        result["ingest"] = ingest_overhead(args, models)
        print(json.dumps(result["ingest"]), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
