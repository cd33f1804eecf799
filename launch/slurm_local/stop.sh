#!/usr/bin/env bash
# Stops the one-node SLURM cluster that launch/slurm_local/start.sh started (slurmd, slurmctld, munged).
#
#   sudo launch/slurm_local/stop.sh            # stop the daemons; jobs and configuration stay
#   sudo launch/slurm_local/stop.sh --purge    # also remove saved jobs, logs and the slurm.conf it wrote
#
# Every job in the queue is cancelled first (scancel), so no job step outlives the daemons.
set -euo pipefail

purge=0
for arg in "$@"; do
  case "$arg" in
    --purge) purge=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "stop.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
if [[ $(id -u) -ne 0 ]]; then echo "stop.sh: needs root; run it with sudo" >&2; exit 1; fi

state=${SLURM_LOCAL_DIR:-/var/lib/llm_jax-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by llm_jax launch/slurm_local/start.sh"

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM the daemon named there, wait up to 10 s, then SIGKILL
  local name=$1 pidfile=$2 pid
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if [[ -n $pid ]] && [[ $(ps -p "$pid" -o comm= 2> /dev/null) == "$name" ]]; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2> /dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2> /dev/null; then kill -KILL "$pid"; fi
    echo "stop.sh: stopped $name (pid $pid)" >&2
  fi
  rm -f "$pidfile"
}

if scontrol ping > /dev/null 2>&1; then
  jobs=$(squeue -h -o %i 2> /dev/null || true)
  if [[ -n $jobs ]]; then
    scancel $jobs || true
    for _ in $(seq 100); do [[ -z $(squeue -h -o %i 2> /dev/null) ]] && break; sleep 0.2; done
    echo "stop.sh: cancelled jobs $(echo $jobs)" >&2
  fi
fi
stop_pidfile slurmd "$state/slurmd.pid"
stop_pidfile slurmctld "$state/slurmctld.pid"
stop_pidfile munged /run/munge/munged.pid

if [[ $purge -eq 1 ]]; then
  rm -rf "$state"
  if [[ -f $conf ]] && head -1 "$conf" | grep -qF "$marker"; then rm -f "$conf"; fi
  echo "stop.sh: removed $state and $conf" >&2
fi
