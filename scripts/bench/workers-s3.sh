#!/usr/bin/env bash
# The same 96 photos read from a local folder and from moto's S3 server on 127.0.0.1 (one worker, one thread),
# then 2 workers writing parts to the bucket and the merge there.
set -euo pipefail
# Needs the release binary (cargo build --release) and moto[server] + boto3 in target/pydeps-moto (the tests
# install them there).
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=$ROOT/target/release/blipdex
M=$ROOT/tests/fixtures/models/itm-a
D=$(mktemp -d)
python3 - "$D/photos" "$ROOT" <<'PY'
import sys, os
from PIL import Image
src = Image.open(sys.argv[2] + '/tests/fixtures/photos/rocket.jpg').convert('RGB').resize((1600, 1200))
os.makedirs(sys.argv[1], exist_ok=True)
for i in range(96):
    im = src.rotate(i * 3.7)
    im.save(f"{sys.argv[1]}/img{i:03}.jpg", quality=90)
PY
PORT=5977
PYTHONPATH=$ROOT/target/pydeps-moto python3 -m moto.server -H 127.0.0.1 -p $PORT >/dev/null 2>&1 &
MOTO=$!
trap 'kill $MOTO; rm -rf $D' EXIT
for i in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
PYTHONPATH=$ROOT/target/pydeps-moto python3 - "$D/photos" $PORT <<'PY'
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[2]}", aws_access_key_id="t", aws_secret_access_key="t", region_name="us-east-1")
s3.create_bucket(Bucket="photos"); s3.create_bucket(Bucket="idx")
for n in sorted(os.listdir(sys.argv[1])): s3.upload_file(os.path.join(sys.argv[1], n), "photos", "a/" + n)
PY
export AWS_ENDPOINT=http://127.0.0.1:$PORT AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=t AWS_SECRET_ACCESS_KEY=t AWS_REGION=us-east-1
export RAYON_NUM_THREADS=1
now() { date +%s.%N; }
t0=$(now); $B ingest --index $D/local --model $M --decode-threads 1 --progress none --json $D/photos >/dev/null
t1=$(now); $B ingest --index $D/froms3 --model $M --decode-threads 1 --progress none --json s3://photos/a >/dev/null
t2=$(now); $B ingest --index s3://idx/one --cache-dir $D/c0 --model $M --decode-threads 1 --progress none --json s3://photos/a >/dev/null
t3=$(now)
$B ingest --index s3://idx/two --cache-dir $D/c1 --model $M --decode-threads 1 --progress none --json --shard 0/2 s3://photos/a >/dev/null & W1=$!
$B ingest --index s3://idx/two --cache-dir $D/c2 --model $M --decode-threads 1 --progress none --json --shard 1/2 s3://photos/a >/dev/null & W2=$!
wait $W1 $W2
t4=$(now); $B index merge --index s3://idx/two --cache-dir $D/c3 >/dev/null
t5=$(now)
python3 -c "
a=$t1-$t0; b=$t2-$t1; c=$t3-$t2; d=$t4-$t3; m=$t5-$t4
print(f'local folder -> local index: {96/a:.1f} images/s')
print(f's3 photos -> local index: {96/b:.1f} images/s ({b/a:.2f}x the time)')
print(f's3 photos -> s3 index: {96/c:.1f} images/s')
print(f'2 workers s3 -> s3 parts: {96/d:.1f} images/s ({c/d:.2f}x one worker); merge on s3 {m:.2f} s')"
