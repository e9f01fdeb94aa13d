#!/usr/bin/env bash
# blipdex ingest as a Slurm job array: each array task is one worker. With no --shard flag,
# blipdex takes shard SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT.
# PHOTOS and INDEX are folders every node reaches, or object-store URLs (s3://, gs://, az://;
# then each task builds its part in BLIPDEX_CACHE_DIR, node-local, and uploads it when done).
#   sbatch pipelines/slurm-array.sh s3://bucket/photos s3://bucket/index
#   sbatch --dependency=afterok:<jobid> --wrap "blipdex index merge --index s3://bucket/index"
#SBATCH --job-name=blipdex-ingest
#SBATCH --array=0-15
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --requeue
set -euo pipefail
photos=${1:?photos: a folder or an object-store prefix}
index=${2:?index: a folder shared by every task, or an object-store prefix}
export BLIPDEX_DEVICE=${BLIPDEX_DEVICE:-cuda} BLIPDEX_DTYPE=${BLIPDEX_DTYPE:-f16}
export BLIPDEX_CACHE_DIR=${BLIPDEX_CACHE_DIR:-${TMPDIR:-/tmp}/blipdex-${USER:-user}}
exec blipdex ingest --index "$index" --model "${BLIPDEX_MODEL:-Salesforce/blip2-itm-vit-g}" \
    --progress json "$photos"
