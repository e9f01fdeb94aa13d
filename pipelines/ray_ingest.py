#!/usr/bin/env python3
"""blipdex ingest on a Ray cluster: one Ray task per shard, then one merge.

    python3 pipelines/ray_ingest.py --address auto --shards 64 --index /shared/index \\
        -- --model /models/blip2-itm-vit-g --device cuda --dtype f16 /shared/photos

Every task runs `blipdex ingest --shard I/N <the arguments after -->` on whichever node Ray places it (one GPU
per task when the cluster has GPUs), so the photos and the index must be reachable from every node: object-store
URLs (s3://, gs://, az://; credentials in each node's environment) or the same paths on a shared file system.
On object storage each task builds its part in its node's --cache-dir and uploads it when complete. A task that fails (its node lost, the process killed) is retried by Ray and resumes
its part; when every shard is done, the driver runs `blipdex index merge` once. Progress: one JSON line per finished
shard on stdout, then a summary line with each shard's result, the wall time and Ray's overhead per shard (a
task's wall time less the time blipdex itself reports).

Needs `ray` (pip install ray) and the blipdex binary on every node (`--blipdex`, default: `blipdex` on PATH).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray


# The object-store schemes blipdex reads (blipdex_remote::SCHEMES).
SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "adl", "file")


def is_url(location: str) -> bool:
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blipdex"


def part_manifests(index: str, cache_dir: str, name: str):
    """Where a worker's part is being built: below the index, or (on object storage) in the node's cache."""
    if is_url(index):
        return list(Path(cache_dir or default_cache_dir()).glob(f"*/parts/{name}/manifest.json"))
    return [Path(index) / "parts" / name / "manifest.json"]


@ray.remote(max_retries=3, retry_exceptions=True)
def ingest_shard(blipdex, index, cache_dir, shard, count, ingest_args, kill_after_first_commit):
    cache = ["--cache-dir", cache_dir] if cache_dir else []
    cmd = [blipdex, "ingest", "--index", index, *cache, "--shard", f"{shard}/{count}", "--progress", "none",
           "--json", *ingest_args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = f"shard-{shard:05}-of-{count:05}"
    marker = (Path(cache_dir or default_cache_dir()) if is_url(index) else Path(index) / "parts") / f".killed-{name}"
    if kill_after_first_commit and not marker.exists():
        # Fault injection for tests: kill -9 the worker once, right after its part's first commit.
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(m.is_file() and json.loads(m.read_text()).get("generation", 0) >= 2
                   for m in part_manifests(index, cache_dir, name)):
                break
            time.sleep(0.02)
        if proc.poll() is None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("killed once by --kill-after-first-commit\n")
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"shard {shard}/{count}: blipdex exited with {proc.returncode}: {err.strip()[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(shard=shard, task_seconds=time.perf_counter() - start)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"), help="Ray cluster address")
    ap.add_argument("--shards", type=int, required=True, help="how many shards (tasks) the input is cut into")
    ap.add_argument("--index", required=True,
                    help="the index: an object-store prefix (s3://bucket/index) or a directory every node reaches")
    ap.add_argument("--cache-dir", default=None,
                    help="blipdex's --cache-dir on every node (parts are built there before upload)")
    ap.add_argument("--blipdex", default="blipdex", help="the blipdex binary on the nodes")
    ap.add_argument("--cpus-per-task", type=float, default=1)
    ap.add_argument("--gpus-per-task", type=float, default=None, help="default: 1 when the cluster has GPUs")
    ap.add_argument("--no-merge", action="store_true", help="leave the parts for a later `blipdex index merge`")
    ap.add_argument("--kill-after-first-commit", type=int, action="append", default=[], metavar="SHARD",
                    help="testing: kill -9 this shard's first attempt after its first commit (Ray retries it)")
    ap.add_argument("ingest_args", nargs=argparse.REMAINDER, help="after --: the arguments of blipdex ingest")
    args = ap.parse_args()
    rest = args.ingest_args[1:] if args.ingest_args[:1] == ["--"] else args.ingest_args
    if args.shards < 1:
        sys.exit("--shards must be at least 1")

    ray.init(address=args.address, logging_level="WARNING")
    gpus = args.gpus_per_task
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    start = time.perf_counter()
    pending = {
        ingest_shard.options(num_cpus=args.cpus_per_task, num_gpus=gpus).remote(
            args.blipdex, args.index, args.cache_dir, i, args.shards, rest, i in args.kill_after_first_commit): i
        for i in range(args.shards)
    }
    results = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(done[0])
        r = ray.get(done[0])
        results.append(r)
        print(json.dumps({"shard": shard, "done": len(results), "of": args.shards, "indexed": r.get("indexed"),
                          "seconds": r.get("seconds")}), flush=True)
    shards_s = time.perf_counter() - start
    merged = None
    if not args.no_merge:
        cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
        out = subprocess.run([args.blipdex, "index", "merge", "--index", args.index, *cache], check=True,
                             capture_output=True, text=True).stdout
        merged = json.loads(out.strip().splitlines()[-1])
    overhead = [r["task_seconds"] - r.get("seconds", 0.0) for r in results]
    print(json.dumps({
        "shards": sorted(results, key=lambda r: r["shard"]),
        "merge": merged,
        "shards_wall_s": shards_s,
        "wall_s": time.perf_counter() - start,
        "ray_overhead_per_shard_s": sum(overhead) / len(overhead),
    }), flush=True)


if __name__ == "__main__":
    main()
