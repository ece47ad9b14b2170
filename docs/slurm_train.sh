#!/bin/bash
# DistributedDataParallel training (or sharded inference) as a SLURM job: srun starts one process per task, each
# running `python -m monai.bundle run <the options given to this script>` with torch.distributed's variables taken
# from SLURM: RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS; MASTER_ADDR = 127.0.0.1
# on one node, else the job's first node; MASTER_PORT = 20000 + job id % 20000 (set MASTER_PORT / MASTER_ADDR to
# choose). Submit from the bundle root; resources go on the sbatch command line (none are requested here). See
# docs/scale.md.
#
#   # CPU (gloo): one node, 2 processes of 4 cores each
#   PYTHON=$PWD/.venv/bin/python sbatch --export=ALL --nodes=1 --ntasks=2 --cpus-per-task=4 --mem=16G \
#       --time=04:00:00 docs/slurm_train.sh training \
#       --config_file "['configs/train.json','configs/multi_gpu_train.json']"
#   # GPUs (nccl): 2 nodes x 4 GPUs, one process per GPU; every task sees its node's GPUs and takes
#   # cuda:LOCAL_RANK (so --gres=gpu:4 per node, not --gpus-per-task, which would hide the others)
#   PYTHON=$PWD/.venv/bin/python sbatch --export=ALL --nodes=2 --ntasks-per-node=4 --gres=gpu:4 \
#       --cpus-per-task=8 --mem=128G --time=04:00:00 docs/slurm_train.sh training \
#       --config_file "['configs/train.json','configs/multi_gpu_train.json']"
#
# Sharded inference: the same with inference --config_file "['configs/inference.json',
# 'configs/multi_gpu_inference.json']".
#
#SBATCH --job-name=preterm-ddp
#SBATCH --output=ddp-%j.log
set -euo pipefail

[ "$#" -gt 0 ] || { echo "usage: sbatch [resources] docs/slurm_train.sh training --config_file ..." >&2; exit 2; }
: "${SLURM_JOB_ID:?submit with sbatch (or run inside an salloc allocation): sbatch [resources] docs/slurm_train.sh ...}"
cd "${BUNDLE:-${SLURM_SUBMIT_DIR:-$PWD}}"  # the bundle root
export PYTHON=${PYTHON:-python}
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [ "${#nodes[@]}" -eq 1 ]; then
    export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
else
    export MASTER_ADDR=${MASTER_ADDR:-${nodes[0]}}
fi
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS} PYTHONHASHSEED=${PYTHONHASHSEED:-0}
# the task count and cores per task given explicitly: srun of SLURM 22.05 does not take --cpus-per-task from the
# job (SLURM_CPUS_PER_TASK); --kill-on-bad-exit: one failed rank ends the others instead of leaving them waiting
srun --ntasks="${SLURM_NTASKS:-1}" --cpus-per-task="$CPUS" --kill-on-bad-exit=1 \
    bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
        exec "$PYTHON" -m monai.bundle run "$@"' slurm_train "$@"
