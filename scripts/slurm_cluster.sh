#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (Debian packages slurmctld, slurmd,
# slurm-client and munge), for the tests of the SLURM plugin and to try a pipeline.
#
#   bash scripts/slurm_cluster.sh          # install if needed, start, wait until idle
#   bash scripts/slurm_cluster.sh stop     # stop the daemons
#
# Needs root and apt. Idempotent: a running cluster is left as it is. No systemd here,
# so the daemons are started by hand; state and logs live under $SLURM_STATE
# (default /var/tmp/synthmorph-slurm).
set -euo pipefail

STATE=${SLURM_STATE:-/var/tmp/synthmorph-slurm}
CONF=/etc/slurm/slurm.conf
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

log() { echo "slurm_cluster: $*" >&2; }

if [[ ${1:-start} == stop ]]; then
    pkill -x slurmd || true
    pkill -x slurmctld || true
    pkill -x munged || true
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    log "needs root (installs packages and starts daemons)"; exit 3
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || { log "apt-get not available"; exit 3; }
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >/dev/null
fi

mkdir -p "$STATE"/{ctld,d} /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

cat > "$CONF.new" <<EOF
# written by synthmorph-nipype scripts/slurm_cluster.sh: a one-node test cluster
ClusterName=synthmorph
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then
    mv "$CONF.new" "$CONF"
    changed=1
else
    rm "$CONF.new"
    changed=0
fi

if ! pgrep -x munged >/dev/null; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
fi
if [[ $changed == 1 ]]; then
    pkill -x slurmd || true
    pkill -x slurmctld || true
    for _ in $(seq 30); do  # wait until they are gone, or the new slurm.conf is not read
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
        sleep 1
    done
fi
if ! pgrep -x slurmctld >/dev/null; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -c
fi
if ! pgrep -x slurmd >/dev/null; then
    log "starting slurmd"
    /usr/sbin/slurmd -N localhost
fi

for _ in $(seq 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
        log "ready: $(sinfo -h -N -o '%N %T %c CPUs')"
        exit 0
    fi
    sleep 1
done
log "the node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log"
exit 1
