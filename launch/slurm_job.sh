# The body shared by launch/slurm_gpu.sbatch and launch/slurm_cpu.sbatch: sourced by them inside the
# allocation (not run on its own), after they set the platform's environment.
#
# Arguments: CONFIG WORKDIR [--config.key=value ...]. One `srun` step runs `python -m llm_jax.train` in
# every task; each task is one JAX process (LLM_JAX_CLUSTER=slurm: jax.distributed reads SLURM_*; the
# coordinator is the step's first node, its port derived from the job id unless JAX_COORDINATOR_PORT is
# set). Logs: $LLM_JAX_LOGDIR (default logs/) /<job name>-<job id>-<task>.log, one per task, appended to
# across requeues. LLM_JAX_PYTHON picks the interpreter (default: `python` on the PATH that sbatch passed).
# Exit 75 from the step (every process saved a checkpoint on SIGTERM) requeues the job, which resumes
# from that checkpoint.
if [[ $# -lt 2 ]]; then
  echo "usage: sbatch launch/slurm_gpu.sbatch (or slurm_cpu.sbatch) CONFIG WORKDIR [--config.k=v ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
logdir=${LLM_JAX_LOGDIR:-logs}
mkdir -p "$logdir"

export PYTHONUNBUFFERED=1
export LLM_JAX_CLUSTER=slurm
export LLM_JAX_CACHE=${LLM_JAX_CACHE:-$PWD/.cache/llm_jax}  # shared: prepared data, compile cache

echo "job $SLURM_JOB_ID: $SLURM_NTASKS processes on $SLURM_JOB_NODELIST; restart ${SLURM_RESTART_COUNT:-0}"

# No --kill-on-bad-exit: a failing process ends its peers through JAX's heartbeat (bounded by
# distributed.heartbeat_timeout_s), and a clean stop must let process 0 finish the checkpoint.
set +e
srun --cpu-bind=none --open-mode=append --output="$logdir/%x-%j-%t.log" \
     "${LLM_JAX_PYTHON:-python}" -m llm_jax.train --config="$config" --workdir="$workdir" "$@"
rc=$?
set -e
echo "srun exited with $rc"
if [[ $rc -eq 75 ]]; then  # stopped cleanly (time limit or preemption): continue in a new allocation
  echo "requeueing job $SLURM_JOB_ID to resume from the checkpoint just saved"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
