#!/usr/bin/env bash
# N processes of one command on this machine, joined through jax.distributed (CPU or GPUs).
#
#   launch/local.sh -n 2 --cpu_devices 4 -- python -m llm_jax.train --config=configs/tiny.py --workdir=runs/t
#   launch/local.sh -n 4 --gpus_per_process 1 -- python -m llm_jax.train --config=configs/gpt_small.py ...
#
# Options:
#   -n N                    processes (default 2)
#   --cpu_devices K         CPU only: K fake CPU devices per process (JAX_PLATFORMS=cpu)
#   --gpus_per_process G    GPU: process i drives GPUs i*G .. i*G+G-1 (JAX_LOCAL_DEVICE_IDS; all GPUs stay
#                           visible to CUDA so NCCL can use NVLink between processes)
#   --logdir DIR            one log per process, DIR/process_<i>.log (default: logs/local-<date>-<pid>);
#                           DIR/pids lists the process ids; process 0's log is also shown here
#   --port P                coordinator port on 127.0.0.1 (default: a free one)
#   --grace S               after a process fails, stop the others after S seconds (default 150);
#                           JAX's own heartbeat (distributed.heartbeat_timeout_s) normally stops them first
#
# Exit status: 0 when every process exits 0, else the first failing process's status. SIGTERM/SIGINT are
# passed on to every process (the training loop then saves a checkpoint and exits with 75).
set -euo pipefail

n=2 cpu_devices="" gpus_per_process="" logdir="" port="" grace=150
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    --cpu_devices) cpu_devices="$2"; shift 2 ;;
    --gpus_per_process) gpus_per_process="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "local.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "local.sh: no command; usage: launch/local.sh -n N [options] -- COMMAND" >&2; exit 2; fi
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then echo "local.sh: -n wants a positive integer, got $n" >&2; exit 2; fi
if [[ -n "$cpu_devices" && -n "$gpus_per_process" ]]; then
  echo "local.sh: give --cpu_devices or --gpus_per_process, not both" >&2; exit 2
fi

python_bin="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
logdir="${logdir:-logs/local-$(date +%Y%m%d-%H%M%S)-$$}"
mkdir -p "$logdir"
: > "$logdir/pids"

pids=()
for ((i = 0; i < n; i++)); do : > "$logdir/process_$i.log"; done
for ((i = 0; i < n; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i"
    export LLM_JAX_CLUSTER=explicit PYTHONUNBUFFERED=1
    if [[ -n "$cpu_devices" ]]; then
      export JAX_PLATFORMS=cpu
      flags="$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<< "${XLA_FLAGS:-}")"
      export XLA_FLAGS="$flags --xla_force_host_platform_device_count=$cpu_devices"
    elif [[ -n "$gpus_per_process" ]]; then
      ids=$(seq -s, $((i * gpus_per_process)) $((i * gpus_per_process + gpus_per_process - 1)))
      export JAX_LOCAL_DEVICE_IDS="$ids"
    fi
    exec "$@"
  ) > "$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
  echo "$!" >> "$logdir/pids"
done
echo "local.sh: $n processes (coordinator 127.0.0.1:$port), logs in $logdir/process_<i>.log" >&2

tail -n +1 -F "$logdir/process_0.log" 2>/dev/null &
tail_pid=$!

forward() {
  echo "local.sh: $1: passing it to every process" >&2
  for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
# Ctrl-C already reaches every process from the terminal; a second SIGINT would abort them at once.
trap 'forward TERM' INT

status=0 failed_at="" running=$n
declare -A done_=()
while [[ $running -gt 0 ]]; do
  for ((i = 0; i < n; i++)); do
    p=${pids[$i]}
    [[ -n "${done_[$i]:-}" ]] && continue
    if ! kill -0 "$p" 2>/dev/null; then
      rc=0; wait "$p" || rc=$?
      done_[$i]=1; running=$((running - 1))
      if [[ $rc -ne 0 ]]; then
        why="exit code $rc"; [[ $rc -gt 128 ]] && why="$why (signal $((rc - 128)))"
        echo "local.sh: process $i (pid $p) stopped with $why; see $logdir/process_$i.log" >&2
        if [[ $status -eq 0 ]]; then status=$rc; failed_at=$(date +%s); fi
      fi
    fi
  done
  if [[ -n "$failed_at" && $running -gt 0 && $(( $(date +%s) - failed_at )) -ge $grace ]]; then
    echo "local.sh: $running process(es) still running ${grace}s after a failure: killing them" >&2
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  fi
  sleep 0.5
done
sleep 0.5
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
exit "$status"
