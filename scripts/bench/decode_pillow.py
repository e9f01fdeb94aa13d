"""Pillow's side of `blipdex bench decode`: the same files, decoded (`Image.open(...).convert("RGB")`, as
transformers' Blip2Processor does) and resized to SIZE x SIZE with Image.BICUBIC, on one thread, best of
--iters runs after a warm-up; prints one JSON line with the same fields.

    python3 scripts/bench/decode_pillow.py --size 224 --iters 3 photos/*.jpg
"""
import argparse
import io
import json
import time

from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--draft", action="store_true",
                    help="JPEG DCT-domain downscaling first (Image.draft), Pillow's fast path")
    a = ap.parse_args()
    data = [open(f, "rb").read() for f in a.files]
    best = (float("inf"), float("inf"))
    pixels = 0
    for _ in range(a.iters + 1):
        dec = res = 0.0
        pixels = 0
        for b in data:
            t = time.perf_counter()
            im = Image.open(io.BytesIO(b))
            if a.draft:
                im.draft("RGB", (a.size * 2, a.size * 2))
            im = im.convert("RGB")
            dec += time.perf_counter() - t
            pixels += im.width * im.height
            t = time.perf_counter()
            im.resize((a.size, a.size), Image.BICUBIC)
            res += time.perf_counter() - t
        best = (min(best[0], dec), min(best[1], res))
    n = len(data)
    print(json.dumps({
        "bench": "decode", "library": "Pillow " + Image.__version__ + (" draft" if a.draft else ""),
        "files": n, "megapixels_per_image": pixels / n / 1e6, "size": a.size,
        "decode_ms_per_image": best[0] * 1e3 / n, "resize_ms_per_image": best[1] * 1e3 / n,
        "images_per_s_per_core": n / (best[0] + best[1]),
    }))


if __name__ == "__main__":
    main()
