#!/usr/bin/env python3
"""How far `--decode fast` moves what blipdex indexes from `--decode exact`, on real photos.

    python3 scripts/bench/decode_fast.py --blipdex target/release/blipdex \
        --model target/bench-models/base-itm --photos DIR [--variants 10] [--work target/decode-fast]

DIR holds JPEG photos (e.g. the photographs of Debian's mate-backgrounds and plasma-workspace-wallpapers
packages: `apt-get download` them and unpack with `dpkg-deb -x`). Each photo is cut into --variants crops
(random boxes of 60-100% of each side, re-encoded at quality 90 by Pillow), so that text search ranks a set of a
useful size (the pixel difference of the resized images is `blipdex bench decode --decode fast`'s
`vs_exact`). Both decodes are ingested into their own index; the script reports
  * embeddings: cosine between each image's 32 ITC query vectors under the two decodes (min, mean, and the 0.1%
    quantile);
  * search: top-10 overlap of exact text search (`--exact`, no ANN noise) over both indexes, per query;
  * ingest images/s of both runs.
One JSON object on stdout.
"""
import argparse
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

QUERIES = [
    "a photo of a flower", "a yellow flower", "green leaves", "a red ladybird on a leaf", "rain drops on glass",
    "a sand dune in the desert", "a stormy sky", "wooden planks", "autumn leaves", "a path through a forest",
    "a meadow with grass", "water", "a butterfly", "a dark sky at night", "an elephant", "blue sky and clouds",
    "a close-up of a plant", "a landscape", "sunset", "a garden",
]


def make_variants(photos: Path, out: Path, n: int, seed: int = 0) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    count = 0
    for src in sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")):
        img = Image.open(src).convert("RGB")
        w, h = img.size
        for i in range(n):
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = rng.randrange(0, w - cw + 1), rng.randrange(0, h - ch + 1)
            img.crop((x, y, x + cw, y + ch)).save(out / f"{src.stem}-{i:02d}.jpg", quality=90)
            count += 1
    return count


def ingest(args, photos: Path, index: Path, mode: str) -> dict:
    shutil.rmtree(index, ignore_errors=True)
    out = subprocess.run([args.blipdex, "ingest", "--model", args.model, "--index", str(index), "--decode", mode,
                          "--progress", "none", "--json", str(photos)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def embeddings(index: Path) -> dict:
    out = {}
    for f in sorted(index.glob("shard-*.parquet")):
        names = pq.read_schema(f).names
        col = next(c for c in ("image_embeds",) if c in names)
        t = pq.read_table(f, columns=["path", col]).to_pydict()
        for path, emb in zip(t["path"], t[col]):
            out[Path(path).name] = np.asarray(emb, dtype=np.float64).reshape(32, -1)
    return out


def search(args, index: Path, query: str) -> list:
    out = subprocess.run([args.blipdex, "search", "--index", str(index), "--model", args.model, "--query", query,
                          "--top-k", "10", "--exact", "--json"], check=True, capture_output=True, text=True)
    hits = json.loads(out.stdout.strip().splitlines()[-1])
    hits = hits.get("hits", hits) if isinstance(hits, dict) else hits
    return [Path(h["path"]).name for h in hits]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blipdex", default="target/release/blipdex")
    ap.add_argument("--model", required=True)
    ap.add_argument("--photos", required=True, type=Path)
    ap.add_argument("--variants", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("target/decode-fast"))
    args = ap.parse_args()
    variants = args.work / "photos"
    n = make_variants(args.photos, variants, args.variants)
    runs = {m: ingest(args, variants, args.work / f"index-{m}", m) for m in ("exact", "fast")}
    e, f = embeddings(args.work / "index-exact"), embeddings(args.work / "index-fast")
    assert e.keys() == f.keys() and len(e) == n, (len(e), len(f), n)
    cos = []
    for k in e:
        a, b = e[k], f[k]
        cos.extend((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    cos = np.asarray(cos)
    overlap = {}
    for q in QUERIES:
        x, y = search(args, args.work / "index-exact", q), search(args, args.work / "index-fast", q)
        overlap[q] = {"overlap": len(set(x) & set(y)), "same_order": x == y}
    print(json.dumps({
        "images": n,
        "source_photos": n // args.variants,
        "ingest_images_per_s": {m: r.get("images_per_s") for m, r in runs.items()},
        "cosine": {"min": cos.min(), "p001": float(np.quantile(cos, 0.001)), "mean": cos.mean()},
        "top10_overlap_mean": float(np.mean([v["overlap"] for v in overlap.values()])),
        "top10_overlap_min": min(v["overlap"] for v in overlap.values()),
        "top10_same_order": sum(v["same_order"] for v in overlap.values()),
        "queries": len(QUERIES),
        "per_query": overlap,
    }, indent=1))


if __name__ == "__main__":
    main()
