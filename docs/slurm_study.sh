#!/bin/bash
# The study as a SLURM job array: one array task per shard, every task on the same WORK dir (a file system all
# nodes share). Submit from the bundle root. No resources are requested in this file (clusters differ: a GPU
# request is refused where no gres is configured, a fixed core or memory request where no node has that many):
# they go on the sbatch command line. See docs/scale.md.
#
#   # CPU nodes: 8 shards of 4 cores each
#   SHARDS=8 DATALIST=/shared/dhcp_prep/datalist.json WORK=/shared/$USER/study PYTHON=$PWD/.venv/bin/python \
#       sbatch --export=ALL --array=1-8 --cpus-per-task=4 --mem=16G --time=12:00:00 \
#       docs/slurm_study.sh --reduced
#   # GPU nodes: one GPU per shard
#   SHARDS=8 DATALIST=/shared/dhcp_prep/datalist.json WORK=/shared/$USER/study PYTHON=$PWD/.venv/bin/python \
#       sbatch --export=ALL --array=1-8 --gres=gpu:1 --cpus-per-task=8 --mem=32G --time=06:00:00 \
#       docs/slurm_study.sh --reduced
#
# Options after the script name go to `python -m scripts.evaluation.study`. Shard k of n runs the (setting, fold)
# runs i (0-based, grid order then fold order) with i % n + 1 == k, with --threads = the task's --cpus-per-task
# (1 without it). OUTPUT (default WORK/results) is the study's --output.
#
# The final stage needs no dependent job: the task that finds every run finished runs it (best setting, final
# model, test inference, reports) under the lock WORK/final.lock; the others end. A cancelled, preempted or
# failed task: resubmit just it with the same SHARDS (SHARDS=8 ... sbatch --export=ALL --array=3 ...
# docs/slurm_study.sh ...): finished runs are reused and, being the last, it runs the final stage. Do not add a
# final job with --dependency=afterok on the array: a resubmitted task has a new job id and such a job stays
# pending forever (DependencyNeverSatisfied). Or, once every run is done: python -m scripts.evaluation.study
# <same options> --merge. The datalist must exist before the array starts (several tasks must not generate the
# synthetic cohort at once): python -m scripts.data.synthetic --output <dir> ..., or scripts/data/dhcp_datalist.py
# + splits.py.
#
#SBATCH --job-name=preterm-study
#SBATCH --output=study-%A_%a.log
set -euo pipefail

: "${SHARDS:?set SHARDS to the number of shards (the size of the first --array; the same on every resubmission)}"
: "${DATALIST:?set DATALIST to the study datalist (folds and a test split)}"
: "${WORK:?set WORK to the shared work dir}"
: "${SLURM_ARRAY_TASK_ID:?submit as an array: sbatch --array=1-$SHARDS ... docs/slurm_study.sh}"
OUTPUT=${OUTPUT:-$WORK/results}
PYTHON=${PYTHON:-python}
THREADS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

cd "${BUNDLE:-$SLURM_SUBMIT_DIR}"  # the bundle root
# with --gres=gpu:1 SLURM sets CUDA_VISIBLE_DEVICES to the task's GPU; train.json's `fast` path is on wherever
# CUDA is available. exec: SLURM's SIGTERM (scancel, time limit, preemption) reaches the study, which then releases
# the final-stage lock if it holds it
exec "$PYTHON" -m scripts.evaluation.study --datalist "$DATALIST" --work_dir "$WORK" --output "$OUTPUT" \
    --shard "${SLURM_ARRAY_TASK_ID}/${SHARDS}" --threads "$THREADS" "$@"
