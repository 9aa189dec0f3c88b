#!/bin/bash
# Plain sbatch + srun, for sites that cannot use submitit (tools/launch.py is the usual way).
#   sbatch slurm/sbatch_example.sh configs/imagenet128.yaml run.dir=$SCRATCH/runs/imagenet128 [key=value ...]
# Edit the #SBATCH lines for your site (or override them: sbatch --nodes=2 --partition=gpu ...).
# Relaunching with the same run.dir resumes from its latest committed checkpoint.
#SBATCH --job-name=ebmscale
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8          # one task per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180            # every task: finish the step, write a checkpoint, exit 3
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued job appends to its log
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
MAX_REQUEUES=${MAX_REQUEUES:-50}
# source /path/to/ebmscale/.venv/bin/activate   # or: module load ...; the venv's bin first on PATH

# rendezvous: every task derives the same address and port (ebmscale.distributed reads them)
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 12000))   # below the ephemeral range (32768+)
echo "$(date -Is) job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"

# exit codes of ebmscale.train.main: 0 completed, 3 stopped with a committed checkpoint, 2 config error
# --kill-on-bad-exit=0: exit 3 is not a failure, a rank that stops first must not kill the others
srun --kill-on-bad-exit=0 python -m ebmscale.train.main "$@"
rc=$?
if [[ $rc == 3 ]]; then
  if (( ${SLURM_RESTART_COUNT:-0} < MAX_REQUEUES )); then
    echo "$(date -Is) stopped with a checkpoint (time limit or preemption): requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "$(date -Is) stopped with a checkpoint; MAX_REQUEUES=$MAX_REQUEUES reached, not requeued: resubmit to continue"
fi
echo "$(date -Is) exit $rc"
exit $rc
