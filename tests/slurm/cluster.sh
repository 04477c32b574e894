#!/usr/bin/env bash
# A one-machine Slurm cluster for the tests (Debian's slurm-wlm and munge): munged, slurmctld and two
# slurmd daemons, `ftjobs-n1` and `ftjobs-n2`, both on this host (`slurmd -N NAME`, each on its own port),
# so a 2-node job runs as one task on each "node". Everything lives under STATE_DIR (default
# /tmp/ftjobs-slurm); the cluster's config is STATE_DIR/slurm.conf: export SLURM_CONF to it to use it.
#   tests/slurm/cluster.sh start [STATE_DIR]   # idempotent: returns once `sinfo` shows both nodes idle
#   tests/slurm/cluster.sh stop [STATE_DIR]
set -euo pipefail
action=${1:-start}
state=$(realpath -m "${2:-/tmp/ftjobs-slurm}")
conf=$state/slurm.conf
export SLURM_CONF=$conf
nodes=(ftjobs-n1 ftjobs-n2)

stop() {
  for pidfile in "$state"/run/*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi

idle_nodes() { sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l; }
# (Without its config file, every Slurm command retries for a minute.)
if [ -e "$conf" ] && [ "$(idle_nodes)" -eq ${#nodes[@]} ]; then
  exit 0  # already up
fi
stop
mkdir -p "$state"/{run,log,ctld,munge} "${nodes[@]/#/$state/spool/}"
chmod 700 "$state/munge"

# munged with a key and socket of its own, so it never meets the machine's munge (if any).
if [ ! -s "$state/munge/munge.key" ]; then
  head -c 1024 /dev/urandom >"$state/munge/munge.key"
  chmod 400 "$state/munge/munge.key"
fi
munged --force --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
  --pid-file="$state/run/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/seed"

cpus=$(nproc)
cat >"$conf" <<CONF
ClusterName=ftjobs-test
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket=$state/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=ftjobs-n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=16821 CPUs=$cpus State=UNKNOWN
NodeName=ftjobs-n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=16822 CPUs=$cpus State=UNKNOWN
PartitionName=ftjobs Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

slurmctld -f "$conf"
for node in "${nodes[@]}"; do
  slurmd -f "$conf" -N "$node"
done

for _ in $(seq 60); do
  if [ "$(idle_nodes)" -eq ${#nodes[@]} ]; then
    exit 0
  fi
  sleep 1
done
echo "the Slurm cluster did not come up; its logs:" >&2
tail -n 20 "$state"/log/*.log >&2
exit 1
