#!/usr/bin/env bash
# Runs several single-GPU benchmark scripts at once, each on its own GPU of one machine (a lease of
# several GPUs costs the same time as one): job I gets CUDA_VISIBLE_DEVICES=I, its own OUT and WORK
# folders and its own server port; its output goes to $OUT/NAME.log. A job is NAME=COMMAND; jobs
# past the GPU count wait for a free GPU. Everything each job wrote under its OUT is packed into
# $OUT/results.tgz (the device tool returns few files); each job's last lines are printed at the end.
#
#   bash bench/gpu_parallel.sh 'train=bash bench/gpu_side_by_side.sh' \
#     'decode=bash bench/gpu_decode.sh' 'serve1=bash bench/gpu_serve.sh'
#
# DEADLINE=S (seconds from the start, default none) stops every job still running at S, so that the
# logs are packed before an outer time limit. Jobs share the host's CPUs: compare host-bound figures (the server's) only with runs made the same way.
set -u
OUT=${OUT:-runs/bench/parallel}
mkdir -p "$OUT"
RES=$(mktemp -d /tmp/gpu_parallel.XXXX)
N=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$N" -ge 1 ] || N=1
T0=$(date +%s)
declare -A BUSY=()  # gpu -> pid

wait_gpu() {  # echoes a free GPU index, waiting for a job to end when all are busy
  while true; do
    for ((g = 0; g < N; g++)); do
      local pid=${BUSY[$g]:-}
      if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then echo "$g"; return; fi
    done
    sleep 2
  done
}

i=0
for job in "$@"; do
  name=${job%%=*} cmd=${job#*=}
  g=$(wait_gpu)
  mkdir -p "$RES/$name"
  left=0  # timeout 0: no limit
  if [ -n "${DEADLINE:-}" ]; then
    left=$(( DEADLINE - ($(date +%s) - T0) ))
    [ "$left" -gt 5 ] || { echo "$name: not started, past the deadline" | tee "$OUT/$name.log"; continue; }
  fi
  echo "[$(( $(date +%s) - T0 ))s] $name on GPU $g: $cmd"
  CUDA_VISIBLE_DEVICES=$g OUT="$RES/$name" WORK="/tmp/gpu_parallel_work_$name" PORT=$((8800 + i)) \
    timeout -k 5 "$left" bash -c "$cmd" > "$OUT/$name.log" 2>&1 &
  BUSY[$g]=$!
  i=$((i + 1))
  sleep 1
done
wait
echo "[$(( $(date +%s) - T0 ))s] all jobs ended"
cp "$OUT"/*.log "$RES/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$RES" .
for job in "$@"; do
  name=${job%%=*}
  echo "=== $name (last lines of $OUT/$name.log)"
  grep -v -E '^[IW][0-9]{4} ' "$OUT/$name.log" | tail -"${TAIL:-14}"
done
