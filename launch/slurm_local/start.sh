#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian/Ubuntu packages, run as root): for trying and testing
# launch/slurm_*.sbatch without a real cluster. Stop it with launch/slurm_local/stop.sh.
#
#   sudo launch/slurm_local/start.sh            # installs munge + slurm if missing, starts, waits for idle
#   sinfo                                       # debug*  up  infinite  1  idle  <host>
#
# What it does: apt-get installs munge, slurmctld, slurmd and slurm-client when slurmctld is missing;
# creates a munge key if there is none; writes /etc/slurm/slurm.conf for this host (the node line from
# `slurmd -C`: its real CPUs and memory; one partition `debug`; no accounting, no cgroups, so it also
# runs in containers); starts munged, slurmctld and slurmd (not through systemd, so it works with or
# without it); and waits until `sinfo` shows the node idle. Daemon state and logs live under
# $SLURM_LOCAL_DIR (default /var/lib/llm_jax-slurm: ctld/, d/, *.log, *.pid).
# Running it again with the cluster up changes nothing. An /etc/slurm/slurm.conf that this script did
# not write is left alone (the script stops with an error) unless --force is given.
set -euo pipefail

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "start.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
if [[ $(id -u) -ne 0 ]]; then
  echo "start.sh: needs root (daemons, /etc/slurm); run it with sudo" >&2; exit 1
fi

state=${SLURM_LOCAL_DIR:-/var/lib/llm_jax-slurm}
conf=/etc/slurm/slurm.conf
marker="# written by llm_jax launch/slurm_local/start.sh"
host=$(hostname -s)

if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v sinfo > /dev/null \
    || ! command -v munged > /dev/null; then
  echo "start.sh: installing munge slurmctld slurmd slurm-client (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q > /dev/null
  apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client > /dev/null
fi

# Already up? (sinfo answers and the node is usable)
if sinfo -h -N -o '%T' 2> /dev/null | grep -qE '^(idle|mixed|allocated|completing)'; then
  echo "start.sh: SLURM is already up: $(sinfo -h -N -o '%N %T %c CPUs')" >&2
  exit 0
fi

# The daemons, srun and JAX's coordinator (the step's first node) all reach this node by its name.
if ! getent hosts "$host" > /dev/null; then
  echo "start.sh: this host's name $host does not resolve; add '127.0.1.1 $host' to /etc/hosts" >&2
  exit 1
fi

if [[ -f $conf ]] && ! head -1 "$conf" | grep -qF "$marker" && [[ $force -eq 0 ]]; then
  echo "start.sh: $conf exists and was not written by this script; give --force to replace it" >&2
  exit 1
fi

# munge: one key shared by every daemon and client (one host here).
if [[ ! -s /etc/munge/munge.key ]]; then
  if command -v mungekey > /dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge > /dev/null
fi

mkdir -p "$state/ctld" "$state/d" /etc/slurm
node_line=$(slurmd -C | head -1)   # NodeName=<host> CPUs=... Boards=... RealMemory=...
cat > "$conf" <<CONF
$marker
# One node, one partition, no accounting, no cgroups. See launch/slurm_local/start.sh.
ClusterName=llm_jax_local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# A requeued job waits cred_expire seconds (default 120) and then the next scheduler pass (default every
# 60 s) before it starts again; short here so that a preempted test job resumes within seconds.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
$node_line State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

# Daemons: -c would wipe saved jobs; a fresh state directory has none anyway.
if ! pgrep -F "$state/slurmctld.pid" slurmctld > /dev/null 2>&1; then slurmctld; fi
if ! pgrep -F "$state/slurmd.pid" slurmd > /dev/null 2>&1; then slurmd; fi

for _ in $(seq 60); do
  st=$(sinfo -h -N -o '%T' 2> /dev/null | head -1 || true)
  case "$st" in
    idle|mixed|allocated) break ;;
    down*|drain*) scontrol update nodename="$host" state=resume 2> /dev/null || true ;;
  esac
  sleep 0.5
done
if ! sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)'; then
  echo "start.sh: the node did not come up; see $state/slurmctld.log and $state/slurmd.log:" >&2
  sinfo -N -l >&2 || true
  tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
  exit 1
fi
echo "start.sh: SLURM is up: $(sinfo -h -N -o '%N %T %c CPUs, partition %P')" >&2
