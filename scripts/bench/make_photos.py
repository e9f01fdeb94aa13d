#!/usr/bin/env python3
"""Camera-sized JPEGs for decode and ingest benchmarks, fast enough to make thousands on the machine under test.

    python3 scripts/bench/make_photos.py --out DIR [--count 3000] [--size 4000x3000] [--distinct 64] [--quality 90]

--distinct pictures are rendered (a fixture photo scaled up, flipped and cropped per picture, with sensor-like
noise so that the files weigh what a camera's do: ~3-4 MB at 12 MP and quality 90) and encoded by Pillow, in
parallel. The other files repeat their pixels with a numbered JPEG comment after SOI, so every file has its own
bytes (ingest would fold byte-identical files into one image) and decodes exactly like its source.
"""
import argparse
import multiprocessing
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "photos"


def render(job):
    i, out, w, h, quality = job
    srcs = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".jpg", ".png", ".gif"))
    img = Image.open(srcs[i % len(srcs)]).convert("RGB")
    if (i // len(srcs)) % 2:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    sw, sh = img.size
    d = (i // (2 * len(srcs))) % 16
    img = img.crop((d, d, sw - d, sh - d)).resize((w, h), Image.BICUBIC)
    px = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(i).normal(0, 8, size=px.shape).astype(np.int16)
    Image.fromarray(np.clip(px + noise, 0, 255).astype(np.uint8)).save(out / f"photo_{i:05d}.jpg", quality=quality)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--distinct", type=int, default=64)
    ap.add_argument("--quality", type=int, default=90)
    a = ap.parse_args()
    w, h = map(int, a.size.split("x"))
    a.out.mkdir(parents=True, exist_ok=True)
    distinct = min(a.distinct, a.count)
    with multiprocessing.Pool() as pool:
        pool.map(render, [(i, a.out, w, h, a.quality) for i in range(distinct)])
    for i in range(distinct, a.count):
        data = (a.out / f"photo_{i % distinct:05d}.jpg").read_bytes()
        comment = f"copy {i}".encode()
        com = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        (a.out / f"photo_{i:05d}.jpg").write_bytes(data[:2] + com + data[2:])
    total = sum(p.stat().st_size for p in a.out.glob("*.jpg"))
    print(f"{a.count} JPEGs of {w}x{h} in {a.out}, {total / a.count / 1e6:.2f} MB each on average")


if __name__ == "__main__":
    main()
