#!/usr/bin/env bash
# Training on every worker of a Cloud TPU VM slice (a pod slice has one host per 4 or 8 chips).
# JAX detects the TPU pod on each worker and joins them through jax.distributed: no addresses to pass.
#
#   launch/tpu_pod.sh TPU ZONE setup                      # this checkout -> every worker, pip install
#   launch/tpu_pod.sh TPU ZONE train CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh TPU ZONE logs [WORKER]              # follow a worker's log (default 0)
#   launch/tpu_pod.sh TPU ZONE status                     # is it running on each worker?
#   launch/tpu_pod.sh TPU ZONE stop                       # SIGTERM everywhere: checkpoint, exit 75
#
# Environment: PROJECT (gcloud --project), REMOTE_DIR (checkout on the workers, default llm_jax in
# the home directory), PIP_EXTRA (more pip arguments for setup).
# WORKDIR must be one filesystem that every worker mounts at the same path (Filestore NFS, or a bucket
# through gcsfuse): Orbax writes each checkpoint from every worker, process 0 writes the metrics. The
# prepared-data cache may be per worker (REMOTE_DIR/.cache: each worker prepares the same data, so the
# corpus must be readable on every worker) or shared (--config.data.cache_dir=/shared/path: prepared once).
# Logs: REMOTE_DIR/logs/train-<hostname>.log on each worker; worker 0 runs process 0, which prints progress
# and writes WORKDIR/metrics.jsonl and WORKDIR/tb. Resume after a preemption (spot VMs) or a stop: run
# the same `train` command again (recreate the slice and run `setup` first if it was deleted).
set -euo pipefail

if [[ $# -lt 3 ]]; then sed -n '2,9p' "$0"; exit 2; fi
tpu=$1 zone=$2 action=$3
shift 3
remote_dir=${REMOTE_DIR:-llm_jax}
gcloud_args=(--zone="$zone")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")

on() {  # on WORKERS COMMAND: run COMMAND (a string, remote shell) on the given workers
  gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker="$1" --command="$2"
}

case "$action" in
  setup)
    archive=$(mktemp -t llm_jax-XXXXXX.tar.gz)
    git -C "$(dirname "$0")/.." ls-files -z | tar -C "$(dirname "$0")/.." --null -T - -czf "$archive"
    gcloud compute tpus tpu-vm scp "$archive" "$tpu:llm_jax.tar.gz" "${gcloud_args[@]}" --worker=all
    rm -f "$archive"
    on all "mkdir -p $remote_dir && tar -xzf llm_jax.tar.gz -C $remote_dir && cd $remote_dir && \
            python3 -m pip install -q -e . 'jax[tpu]' ${PIP_EXTRA:-} && \
            python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"local TPU chips\")'"
    ;;
  train)
    if [[ $# -lt 2 ]]; then echo "usage: $0 TPU ZONE train CONFIG WORKDIR [--config.key=value ...]" >&2; exit 2; fi
    config=$1 workdir=$2
    shift 2
    args=$(printf ' %q' --config="$config" --workdir="$workdir" "$@")
    on all "cd $remote_dir && mkdir -p logs && \
            if [ -f logs/train.pid ] && kill -0 \$(cat logs/train.pid) 2>/dev/null; then \
              echo \"already running on \$(hostname)\"; exit 1; fi; \
            export LLM_JAX_CLUSTER=tpu PYTHONUNBUFFERED=1 LLM_JAX_CACHE=\${LLM_JAX_CACHE:-\$PWD/.cache}; \
            nohup python3 -m llm_jax.train$args > logs/train-\$(hostname).log 2>&1 < /dev/null & \
            echo \$! > logs/train.pid; echo \"started on \$(hostname): pid \$!\""
    echo "follow it: $0 $tpu $zone logs" >&2
    ;;
  logs)
    on "${1:-0}" "tail -n 200 -F $remote_dir/logs/train-\$(hostname).log"
    ;;
  status)
    on all "cd $remote_dir && if [ -f logs/train.pid ] && kill -0 \$(cat logs/train.pid) 2>/dev/null; \
            then echo \"\$(hostname): running (pid \$(cat logs/train.pid))\"; \
            else echo \"\$(hostname): not running; last lines:\"; tail -n 3 logs/train-\$(hostname).log; fi"
    ;;
  stop)
    on all "cd $remote_dir && kill -TERM \$(cat logs/train.pid) && echo \"\$(hostname): SIGTERM sent\""
    ;;
  *)
    echo "unknown action $action (setup, train, logs, status, stop)" >&2; exit 2 ;;
esac
