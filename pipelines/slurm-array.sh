#!/usr/bin/env bash
# blipdex ingest as a Slurm job array: each array task is one worker. With no --shard flag,
# blipdex takes shard SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT.
#   sbatch pipelines/slurm-array.sh /shared/photos /shared/index
#   sbatch --dependency=afterok:<jobid> --wrap "blipdex index merge --index /shared/index"
#SBATCH --job-name=blipdex-ingest
#SBATCH --array=0-15
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --requeue
set -euo pipefail
photos=${1:?photo folder}
index=${2:?index directory (shared by every task)}
exec blipdex ingest --index "$index" --model "${BLIPDEX_MODEL:-Salesforce/blip2-itm-vit-g}" \
    --device cuda --dtype f16 --progress json "$photos"
