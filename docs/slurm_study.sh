#!/bin/bash
# The study as a SLURM job array: one array task per shard, every task on the same --work_dir (a shared file
# system). Not run by the tests (no SLURM here); see docs/scale.md.
#
#   SHARDS=8 DATALIST=/data/dhcp_prep/datalist.json WORK=/shared/$USER/study \
#       sbatch --array=1-8 --export=ALL docs/slurm_study.sh [more study options, e.g. --reduced]
#
# Shard k of n runs the (setting, fold) runs i (0-based, grid order then fold order) with i % n + 1 == k. The
# task that finds every run finished runs the final stage (best setting, final model, test inference, reports)
# under the lock <WORK>/final.lock; the others end. A failed or preempted task: resubmit just it with the same
# SHARDS (SHARDS=8 ... sbatch --array=3 docs/slurm_study.sh): finished runs are reused. Or, once every run is
# done, run the final stage alone: python -m scripts.evaluation.study <same options> --merge
# The datalist must exist before the array starts (several tasks must not generate the synthetic cohort at
# once): python -m scripts.data.synthetic --output <dir> ..., or scripts/data/dhcp_datalist.py + splits.py.
#
#SBATCH --job-name=preterm-study
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=06:00:00
#SBATCH --output=study-%A_%a.log
set -euo pipefail

: "${SHARDS:?set SHARDS to the number of shards (the size of the first --array; the same on every resubmission)}"
: "${DATALIST:?set DATALIST to the study datalist (folds and a test split)}"
: "${WORK:?set WORK to the shared work dir}"
OUTPUT=${OUTPUT:-$WORK/results}
PYTHON=${PYTHON:-python}

cd "${BUNDLE:-$SLURM_SUBMIT_DIR}"  # the bundle root
# SLURM sets CUDA_VISIBLE_DEVICES for the task's GPU; train.json's `fast` path is on wherever CUDA is available
exec "$PYTHON" -m scripts.evaluation.study --datalist "$DATALIST" --work_dir "$WORK" --output "$OUTPUT" \
    --shard "${SLURM_ARRAY_TASK_ID}/${SHARDS}" --threads "${SLURM_CPUS_PER_TASK:-1}" "$@"
