#!/usr/bin/env bash
# A two-node SLURM cluster on this one machine, for trying and testing the launch scripts.
#
#   launch/local-cluster.sh start    install (apt, as root, only what is missing) and start
#                                    munged, slurmctld and two slurmd (node1, node2); idempotent
#   launch/local-cluster.sh stop     end only the daemons that `start` started
#   launch/local-cluster.sh status   daemon state and `sinfo`
#   launch/local-cluster.sh env      print `export SLURM_CONF=...` for `eval`
#
# Environment:
#   UMBRELLA_SLURM_DIR   state directory (default /tmp/umbrella-slurm): slurm.conf, logs,
#                        spool and state per node, and the pid files of what `start` started
#   UMBRELLA_SLURM_PORT  slurmctld port (default 6817); node1 and node2 use the next two
#   UMBRELLA_SLURM_CPUS  CPUs declared per node (default 2; more than the machine has is fine,
#                        the nodes just oversubscribe it)
#   UMBRELLA_SLURM_GPUS  GPUs declared per node (default 2; 0 for none): GPU GRES backed by
#                        character devices (copies of /dev/null) in STATE_DIR/dev, so
#                        `sbatch --gpus-per-node=2` allocates here and sets SLURM_GPUS_ON_NODE and
#                        CUDA_VISIBLE_DEVICES as on a GPU cluster; no GPU is behind them (train
#                        with train.device=cpu and DS_ACCELERATOR=cpu)
#
# The config lives in the state directory. Every slurm command reads it through SLURM_CONF;
# jobs inherit SLURM_CONF from the submitting shell. When /etc/slurm/slurm.conf does not exist,
# `start` also links it there (and `stop` removes that link), so plain `sinfo` works too.
#
# Why Debian's packages work: Debian builds slurmd with --enable-multiple-slurmd, so
# `slurmd -N node1` and `slurmd -N node2` can share one host, each with its own port and %n paths.
set -euo pipefail

STATE_DIR=${UMBRELLA_SLURM_DIR:-/tmp/umbrella-slurm}
CTLD_PORT=${UMBRELLA_SLURM_PORT:-6817}
NODE_CPUS=${UMBRELLA_SLURM_CPUS:-2}
NODE_GPUS=${UMBRELLA_SLURM_GPUS:-2}
CONF=$STATE_DIR/slurm.conf
NODES=(node1 node2)
PACKAGES=(munge slurmctld slurmd slurm-client)
START_TIMEOUT_S=60

die() {
	echo "local-cluster: error: $*" >&2
	exit 1
}
log() { echo "local-cluster: $*"; }

# True when PID is alive and its command line contains PATTERN (guards against reused pids).
pid_is() {
	local pid=$1 pattern=$2
	[[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
	tr '\0' ' ' </proc/"$pid"/cmdline | grep -qF -- "$pattern"
}

read_pid() { [[ -r $1 ]] && tr -d '[:space:]' <"$1" || true; }

install_packages() {
	local missing=() pkg
	for pkg in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
			missing+=("$pkg")
	done
	((${#missing[@]} == 0)) && return 0
	[[ $(id -u) == 0 ]] || die "missing packages ${missing[*]}: run as root, or: sudo apt-get install ${missing[*]}"
	log "installing ${missing[*]} (apt)"
	# Keep the packages' own services from starting with Debian's default config: this script
	# starts the daemons itself. Docker-style images already ship this policy file.
	local own_policy=""
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		own_policy=/usr/sbin/policy-rc.d
		printf '#!/bin/sh\nexit 101\n' >"$own_policy"
		chmod 755 "$own_policy"
	fi
	local rc=0
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends "${missing[@]}" >/dev/null; } || rc=$?
	[[ -n $own_policy ]] && rm -f "$own_policy"
	((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

start_munge() {
	if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
		log "munged already running"
		return 0
	fi
	[[ $(id -u) == 0 ]] || die "munged is not running and starting it needs root"
	if [[ ! -s /etc/munge/munge.key ]]; then
		log "creating /etc/munge/munge.key"
		mkdir -p /etc/munge
		if command -v mungekey >/dev/null; then
			mungekey --create --keyfile=/etc/munge/munge.key --force
		else
			dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
		fi
	fi
	chown munge:munge /etc/munge /etc/munge/munge.key
	chmod 700 /etc/munge
	chmod 400 /etc/munge/munge.key
	install -d -o munge -g munge -m 755 /run/munge
	install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
	runuser -u munge -- /usr/sbin/munged
	local pid
	for _ in $(seq 50); do
		pid=$(read_pid /run/munge/munged.pid)
		[[ -n $pid ]] && break
		sleep 0.1
	done
	[[ -n $pid ]] || die "munged did not write /run/munge/munged.pid (see /var/log/munge/munged.log)"
	echo "$pid" >"$STATE_DIR/munged.started.pid"
	munge -n </dev/null | unmunge >/dev/null || die "munge round trip failed (see /var/log/munge/munged.log)"
	log "started munged (pid $pid)"
}

# The fake GPUs: gres.conf beside slurm.conf naming STATE_DIR/dev/nvidia0..N-1 (a count-only
# line without File= leaves the nodes INVAL: "gres/gpu count reported lower than configured").
write_gres() {
	local gres=$STATE_DIR/gres.conf i
	rm -f "$gres"
	((NODE_GPUS > 0)) || return 0
	mkdir -p "$STATE_DIR/dev"
	for ((i = 0; i < NODE_GPUS; i++)); do
		[[ -c $STATE_DIR/dev/nvidia$i ]] || mknod "$STATE_DIR/dev/nvidia$i" c 1 3 ||
			die "cannot create the fake GPU device $STATE_DIR/dev/nvidia$i (mknod needs root)"
	done
	echo "NodeName=node[1-2] Name=gpu File=$STATE_DIR/dev/nvidia[0-$((NODE_GPUS - 1))]" >"$gres"
}

write_conf() {
	local host gres_types="" node_gres=""
	host=$(hostname -s)
	mkdir -p "$STATE_DIR"/{ctld,log}
	write_gres
	if ((NODE_GPUS > 0)); then
		gres_types="GresTypes=gpu"
		node_gres="Gres=gpu:$NODE_GPUS"
	fi
	local tmp=$CONF.tmp.$$
	cat >"$tmp" <<EOF
# Written by launch/local-cluster.sh: two nodes on one host ($host), for tests and trials.
ClusterName=umbrella
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdSpoolDir=$STATE_DIR/spool-%n
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
MessageTimeout=10
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
MinJobAge=600
KillOnBadExit=0
$gres_types
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1)) CPUs=$NODE_CPUS $node_gres State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 2)) CPUs=$NODE_CPUS $node_gres State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
	# Daemons started with another config (e.g. before GPUs were declared) are restarted.
	if [[ -r $CONF ]] && ! cmp -s "$tmp" "$CONF"; then
		log "the config changed: restarting what this script started"
		cmd_stop_daemons
	fi
	mv "$tmp" "$CONF"
	if [[ ! -e /etc/slurm/slurm.conf && $(id -u) == 0 ]]; then
		mkdir -p /etc/slurm
		ln -s "$CONF" /etc/slurm/slurm.conf
		echo /etc/slurm/slurm.conf >"$STATE_DIR/etc-link.created"
	fi
}

# Starts one daemon unless the pid recorded for it is still that daemon.
start_daemon() {
	local name=$1 pidfile=$2
	shift 2
	local pid
	pid=$(read_pid "$STATE_DIR/$name.started.pid")
	if pid_is "$pid" "$CONF"; then
		log "$name already running (pid $pid)"
		return 0
	fi
	rm -f "$pidfile"
	"$@" || die "$name failed to start (see $STATE_DIR/log/)"
	for _ in $(seq 100); do
		pid=$(read_pid "$pidfile")
		[[ -n $pid ]] && pid_is "$pid" "$CONF" && break
		sleep 0.1
	done
	pid_is "$pid" "$CONF" || die "$name did not stay up (see $STATE_DIR/log/)"
	echo "$pid" >"$STATE_DIR/$name.started.pid"
	log "started $name (pid $pid)"
}

wait_idle() {
	local deadline=$((SECONDS + START_TIMEOUT_S)) states=""
	while ((SECONDS < deadline)); do
		states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | tr '\n' ' ')
		if [[ $states == *"node1 idle"* && $states == *"node2 idle"* ]]; then
			log "nodes idle: $states"
			return 0
		fi
		# A node left down or drained by an earlier run is brought back.
		if [[ $states =~ (down|drain) ]]; then
			SLURM_CONF=$CONF scontrol update NodeName=node1,node2 State=RESUME >/dev/null 2>&1 || true
		fi
		sleep 1
	done
	die "nodes not idle after ${START_TIMEOUT_S}s (sinfo: ${states:-no answer}); see $STATE_DIR/log/"
}

cmd_start() {
	mkdir -p "$STATE_DIR"
	install_packages
	start_munge
	write_conf
	export SLURM_CONF=$CONF
	# -c: start from a clean job table. This cluster is for trying scripts and for tests; a job
	# left "running" by a previous session whose processes are gone would hold both nodes.
	start_daemon slurmctld "$STATE_DIR/slurmctld.pid" slurmctld -c -f "$CONF"
	local node
	for node in "${NODES[@]}"; do
		start_daemon "slurmd-$node" "$STATE_DIR/slurmd-$node.pid" slurmd -f "$CONF" -N "$node"
	done
	wait_idle
	echo "export SLURM_CONF=$CONF"
}

stop_pid() {
	local name=$1 pattern=$2 record=$STATE_DIR/$1.started.pid pid
	pid=$(read_pid "$record")
	if pid_is "$pid" "$pattern"; then
		kill "$pid"
		for _ in $(seq 50); do
			pid_is "$pid" "$pattern" || break
			sleep 0.1
		done
		pid_is "$pid" "$pattern" && kill -9 "$pid"
		log "stopped $name (pid $pid)"
	fi
	rm -f "$record"
}

cmd_stop_daemons() {
	local node
	for node in "${NODES[@]}"; do
		stop_pid "slurmd-$node" "$CONF"
	done
	stop_pid slurmctld "$CONF"
}

cmd_stop() {
	cmd_stop_daemons
	stop_pid munged munged
	if [[ -r $STATE_DIR/etc-link.created ]]; then
		[[ -L /etc/slurm/slurm.conf ]] && rm -f /etc/slurm/slurm.conf
		rm -f "$STATE_DIR/etc-link.created"
	fi
}

cmd_status() {
	local name pid rc=0
	for name in munged slurmctld slurmd-node1 slurmd-node2; do
		pid=$(read_pid "$STATE_DIR/$name.started.pid")
		if [[ -n $pid ]] && pid_is "$pid" "${name%%-*}"; then
			echo "$name: running (pid $pid, started by this script)"
		elif [[ $name == munged ]] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
			echo "munged: running (not started by this script)"
		else
			echo "$name: not running"
			rc=1
		fi
	done
	if [[ -r $CONF ]]; then
		echo "SLURM_CONF=$CONF"
		SLURM_CONF=$CONF sinfo -N -o '%N %P %T %c' 2>&1 || rc=1
	fi
	return $rc
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
	echo "usage: $0 start|stop|status|env" >&2
	exit 2
	;;
esac
