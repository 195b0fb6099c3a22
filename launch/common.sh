# Shared by launch/train.sbatch and launch/train-srun.sbatch (sourced, not run): settings,
# signal forwarding, the wait that lets traps run, failure reports and requeue-on-75.
#
# Why a background step and a `wait` loop: bash runs a trap only after the foreground command
# returns, so a step in the foreground would hold back the forwarded signal until training ended.

# Exit statuses of the trainer (docs/OPERATIONS.md): 0 finished, 75 stopped after a complete
# checkpoint (EX_TEMPFAIL: requeue), 2 a user error (config, data, paths), anything else failed.
readonly UMBRELLA_EXIT_STOPPED=75
# 2: a user error (umbrella_ds/errors.py): one "error: WHERE: WHAT" line from rank 0, no traceback.
readonly UMBRELLA_EXIT_USER_ERROR=2

umbrella_log() { echo "umbrella[$(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}]: $*" >&2; }

umbrella_die() {
	umbrella_log "error: $*"
	exit 1
}

# A submission the scripts cannot run as asked (e.g. ranks per node that leave GPUs idle): one
# line, status 2 like the trainer's user errors, so the job is not requeued.
umbrella_refuse() {
	umbrella_log "error: $*"
	exit "$UMBRELLA_EXIT_USER_ERROR"
}

# GPUs the job holds on this (the batch) node, 0 for none: SLURM_GPUS_ON_NODE (set for
# --gpus-per-node, --gres=gpu:N and --gpus), else SLURM_GPUS_PER_NODE ("4" or "TYPE:4"), else
# the indices in SLURM_JOB_GPUS.
umbrella_gpus_per_node() {
	local n=${SLURM_GPUS_ON_NODE:-}
	[[ -z $n && -n ${SLURM_GPUS_PER_NODE:-} ]] && n=${SLURM_GPUS_PER_NODE##*:}
	[[ -z $n && -n ${SLURM_JOB_GPUS:-} ]] && n=$(tr ',' '\n' <<<"$SLURM_JOB_GPUS" | grep -c .)
	[[ $n =~ ^[0-9]+$ ]] || n=0
	echo "$n"
}

# Ranks per node and CPUs per rank (docs/OPERATIONS.md, "First run on a GPU cluster").
# With GPUs: one rank per GPU; an --ntasks-per-node or PROCS_PER_NODE that differs is refused, as
# it would leave GPUs idle (or put two ranks on one). Without: PROCS_PER_NODE, else
# --ntasks-per-node, else 1. CPUs per rank: --cpus-per-task as submitted, else the CPUs the job
# holds on the node (all of them: the scripts ask for --exclusive) divided by the ranks; never
# more than the node has. Exported as SRUN_CPUS_PER_TASK, since srun does not inherit sbatch's
# --cpus-per-task (Slurm 22.05 on), and as OMP_NUM_THREADS unless the submitter exported one.
umbrella_ranks() {
	local gpus asked=${SLURM_NTASKS_PER_NODE:-} node=${SLURMD_NODENAME:-this node}
	gpus=$(umbrella_gpus_per_node)
	if ((gpus > 0)); then
		[[ -z $asked || $asked == "$gpus" ]] ||
			umbrella_refuse "--ntasks-per-node=$asked differs from the $gpus GPUs per node: one rank runs per GPU; drop --ntasks-per-node (or set it to $gpus)"
		[[ -z ${PROCS_PER_NODE:-} || $PROCS_PER_NODE == "$gpus" ]] ||
			umbrella_refuse "PROCS_PER_NODE=$PROCS_PER_NODE differs from the $gpus GPUs per node: one rank runs per GPU; unset PROCS_PER_NODE"
		PROCS_PER_NODE=$gpus
	else
		PROCS_PER_NODE=${PROCS_PER_NODE:-${asked:-1}}
	fi
	[[ $PROCS_PER_NODE =~ ^[1-9][0-9]*$ ]] || umbrella_die "PROCS_PER_NODE=$PROCS_PER_NODE is not a positive integer"
	local node_cpus=${SLURM_CPUS_ON_NODE:-1} per_rank
	if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
		per_rank=$SLURM_CPUS_PER_TASK
		((per_rank * PROCS_PER_NODE <= node_cpus)) ||
			umbrella_refuse "--cpus-per-task=$per_rank x $PROCS_PER_NODE ranks per node is more than the $node_cpus CPUs the job holds on $node; lower --cpus-per-task"
	else
		per_rank=$((node_cpus / PROCS_PER_NODE))
		((per_rank >= 1)) ||
			umbrella_refuse "the job holds $node_cpus CPUs on $node for $PROCS_PER_NODE ranks: submit with --exclusive or --cpus-per-task"
	fi
	export SRUN_CPUS_PER_TASK=$per_rank
	local omp="OMP_NUM_THREADS=$per_rank"
	if [[ -n ${OMP_NUM_THREADS:-} ]]; then omp="OMP_NUM_THREADS=$OMP_NUM_THREADS (exported)"; else export OMP_NUM_THREADS=$per_rank; fi
	umbrella_log "$PROCS_PER_NODE ranks per node ($gpus GPUs per node), $per_rank of the node's $node_cpus CPUs per rank, $omp"
}

# Validates the environment variables the scripts document and fills defaults.
umbrella_settings() {
	umbrella_traps
	UMBRELLA_RESIGNAL_S=${UMBRELLA_RESIGNAL_S:-10}
	UMBRELLA_SIGNAL_GRACE_S=${UMBRELLA_SIGNAL_GRACE_S:-120}
	[[ -n ${SLURM_JOB_ID:-} ]] || umbrella_die "not inside a SLURM job: submit with sbatch"
	[[ -n ${CONFIG:-} ]] || umbrella_die "CONFIG is not set (the run YAML, e.g. CONFIG=configs/demo.yaml)"
	[[ -n ${OUT:-} ]] || umbrella_die "OUT is not set (the output directory of the run)"
	[[ -r $CONFIG ]] || umbrella_die "CONFIG=$CONFIG is not a readable file (relative to $PWD)"
	umbrella_ranks
	MAX_REQUEUES=${MAX_REQUEUES:-3}
	[[ $MAX_REQUEUES =~ ^[0-9]+$ ]] || umbrella_die "MAX_REQUEUES=$MAX_REQUEUES is not a non-negative integer"
	UMBRELLA_TRAIN_SCRIPT=${UMBRELLA_TRAIN_SCRIPT:-umbrella_ds/train/__main__.py}
	[[ -r $UMBRELLA_TRAIN_SCRIPT ]] || umbrella_die "training script $UMBRELLA_TRAIN_SCRIPT not found under $PWD (submit from the repository root or set UMBRELLA_ROOT)"
	if [[ -z ${UMBRELLA_PYTHON:-} ]]; then
		if [[ -x .venv/bin/python ]]; then UMBRELLA_PYTHON=$PWD/.venv/bin/python; else UMBRELLA_PYTHON=python3; fi
	fi
	command -v "$UMBRELLA_PYTHON" >/dev/null || umbrella_die "UMBRELLA_PYTHON=$UMBRELLA_PYTHON is not an executable"
	mkdir -p "$OUT" || umbrella_die "cannot create OUT=$OUT"
	NUM_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
	WORLD_SIZE_WANTED=$((NUM_NODES * PROCS_PER_NODE))
	RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
	export PYTHONUNBUFFERED=1
	umbrella_master
}

# MASTER_ADDR/MASTER_PORT for torch.distributed: the first node's address as SLURM knows it
# (NodeAddr; equal to the host name on most clusters, 127.0.0.1 on the local cluster) and a
# port derived from the job id, so two jobs sharing a node do not collide.
umbrella_master() {
	local first addr
	first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
	[[ -n $first ]] || umbrella_die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
	addr=$(scontrol show node "$first" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
	export MASTER_ADDR=${MASTER_ADDR:-${addr:-$first}}
	export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
}

# The trainer's arguments: --config, OUT as output_dir, one --set per OVERRIDES pair, --resume auto.
umbrella_train_args() {
	UMBRELLA_TRAIN_ARGS=(--config "$CONFIG" --set "output_dir=$OUT")
	local pair
	for pair in ${OVERRIDES:-}; do
		[[ $pair == *=* ]] || umbrella_die "OVERRIDES entry '$pair' is not key=value"
		UMBRELLA_TRAIN_ARGS+=(--set "$pair")
	done
	UMBRELLA_TRAIN_ARGS+=(--resume auto)
}

# The trap target: remembers the request; umbrella_pass_signal hands it to the ranks.
umbrella_forward() {
	UMBRELLA_STOP_REQUESTED=$1
	umbrella_log "got SIG$1: the training ranks will checkpoint and stop"
	umbrella_pass_signal
}

# Installed before anything else runs: bash's default for USR1 is to die.
umbrella_traps() {
	UMBRELLA_STOP_REQUESTED=""
	UMBRELLA_LAST_FORWARD=""
	UMBRELLA_STEP_STARTED=""
	trap 'umbrella_forward USR1' USR1
	trap 'umbrella_forward TERM' TERM
}

# True once the ranks can take a signal: this start's "split": "start" record is in
# OUT/metrics.jsonl (written after every rank installed its handler and joined), or the step has
# run UMBRELLA_SIGNAL_GRACE_S. Before that a rank may still be in Python's start-up, where USR1
# kills it: Slurm sends the --signal warning up to a minute early, even before the ranks exist.
umbrella_ranks_ready() {
	[[ -n $UMBRELLA_STEP_STARTED ]] || return 1
	((SECONDS - UMBRELLA_STEP_STARTED >= UMBRELLA_SIGNAL_GRACE_S)) && return 0
	(($(umbrella_start_records) > UMBRELLA_STARTS_BEFORE))
}

umbrella_start_records() {
	local n
	n=$(grep -cE '"split": *"start"' "$OUT/metrics.jsonl" 2>/dev/null) || true
	echo "${n:-0}"
}

# Passes a pending stop request to the job steps (plain `scancel --signal` skips the batch
# shell) once the ranks are ready, and again every UMBRELLA_RESIGNAL_S while the step runs
# (the ranks treat repeats as one request).
umbrella_pass_signal() {
	[[ -n $UMBRELLA_STOP_REQUESTED ]] && umbrella_ranks_ready || return 0
	if [[ -n $UMBRELLA_LAST_FORWARD ]]; then
		((SECONDS - UMBRELLA_LAST_FORWARD >= UMBRELLA_RESIGNAL_S)) || return 0
		umbrella_log "training still running: repeating SIG$UMBRELLA_STOP_REQUESTED"
	fi
	UMBRELLA_LAST_FORWARD=$SECONDS
	scancel --signal="$UMBRELLA_STOP_REQUESTED" "$SLURM_JOB_ID" ||
		umbrella_log "scancel --signal=$UMBRELLA_STOP_REQUESTED failed"
}

# Cancels the job's steps (not the job: `scancel --signal=KILL JOB` would cancel the batch too).
umbrella_kill_steps() {
	local step
	for step in $(squeue --steps --jobs="$SLURM_JOB_ID" -h -o %i | grep -E "^$SLURM_JOB_ID\.[0-9]+$"); do
		scancel "$step" || umbrella_log "scancel $step failed"
	done
}

# srun's lines about tasks that ended badly: "srun: error: NODE: task N: Exited with exit code C",
# "...: task N: Killed", "srun: error: task N launch failed: ...". Status 75 is not bad: it is a
# rank that stopped after the agreed checkpoint.
umbrella_bad_tasks() {
	local lines
	lines=$(grep -E '^srun: error: ([^:]+: )?tasks? [0-9]' "$UMBRELLA_STEP_LOG" 2>/dev/null |
		grep -vE 'Exited with exit code 75$') || return 1
	# A rank killed by a signal (or that failed to launch) is the cause; peers then exit with a
	# status of their own, and srun may report them first: causes first.
	grep -v 'Exited with exit code' <<<"$lines"
	grep 'Exited with exit code' <<<"$lines"
	return 0
}

# Runs "$@" (the step that starts the ranks) in the background and waits for it, so that traps
# run at once (bash runs a trap only after a foreground command ends). USR1 and TERM are ignored
# in the step: the deepspeed runner and srun in the batch step must outlive
# `scancel --full --signal=USR1` (Python dies on USR1 by default) and the TERM of a cancel or time
# limit, until the ranks have checkpointed. Keeps the step's stderr for the failure report.
#
# Watchdog instead of srun --kill-on-bad-exit: that option counts status 75 as a bad exit, so
# the first rank to finish its stop would kill the others, rank 0 possibly while it still writes
# `latest`. Here a rank that ends with any other status (or a signal) has the job's steps killed
# at once, with a message naming the rank and node. A hung rank makes the others fail at the
# collective timeout (train.collective_timeout_s), which then ends it the same way.
# Sets UMBRELLA_STEP_RC.
umbrella_run_step() {
	UMBRELLA_STEP_LOG=${TMPDIR:-/tmp}/umbrella-step-$SLURM_JOB_ID-$RESTART_COUNT.err
	: >"$UMBRELLA_STEP_LOG"
	trap 'rm -f "$UMBRELLA_STEP_LOG"' EXIT
	UMBRELLA_KILLED_FOR=""
	umbrella_log "restart $RESTART_COUNT of at most $MAX_REQUEUES; nodes $SLURM_JOB_NODELIST; $WORLD_SIZE_WANTED ranks; master $MASTER_ADDR:$MASTER_PORT"
	umbrella_log "running: $*"
	UMBRELLA_STARTS_BEFORE=$(umbrella_start_records)
	UMBRELLA_STEP_STARTED=$SECONDS
	(
		trap '' USR1 TERM
		exec "$@" 2> >(tee -a "$UMBRELLA_STEP_LOG" >&2)
	) &
	local pid=$! rc=0 bad
	while kill -0 "$pid" 2>/dev/null; do
		sleep 1 &
		wait $! 2>/dev/null # a trap interrupts this wait, not a foreground sleep
		if [[ -z $UMBRELLA_KILLED_FOR ]] && umbrella_bad_tasks >/dev/null; then
			# srun names each task as its node's slurmstepd notices: a peer that exited because
			# a rank died can be named first. A moment's grace lets srun name the dead one too.
			sleep 3 &
			wait $! 2>/dev/null
			bad=$(umbrella_bad_tasks)
			UMBRELLA_KILLED_FOR=$(head -n 1 <<<"$bad")
			umbrella_log "a rank failed ($UMBRELLA_KILLED_FOR): killing the other ranks"
			umbrella_kill_steps
		fi
		umbrella_pass_signal
	done
	UMBRELLA_STEP_STARTED=""
	while true; do
		wait "$pid"
		rc=$?
		kill -0 "$pid" 2>/dev/null || break
	done
	UMBRELLA_STEP_RC=$rc
}

# Names the failed ranks from srun's report: the task number is the rank (SLURM_PROCID).
umbrella_report_failure() {
	local rc=$1 lines line
	sleep 1 # let tee write srun's last lines
	umbrella_log "training failed (exit status $rc)"
	lines=$(umbrella_bad_tasks || true) # every task srun named, causes first
	if [[ -z $lines ]]; then
		umbrella_log "srun named no failed task; see the rank logs above (each rank logs its rank and host at start)"
		return
	fi
	while IFS= read -r line; do
		# "srun: error: node2: task 1: Exited with exit code 1" -> "rank 1 on node node2 failed: ..."
		umbrella_log "$(sed -E -e 's/^srun: error: ([^:]+): tasks? ([0-9,-]+): (.*)$/rank \2 on node \1 failed: \3/' \
			-e 's/^srun: error: tasks? ([0-9,-]+) (.*)$/rank \1 \2/' <<<"$line")"
	done <<<"$lines"
}

# Acts on the step's status: 0 done, 75 requeue (up to MAX_REQUEUES), else fail naming ranks.
umbrella_finish() {
	local rc=$UMBRELLA_STEP_RC
	if ((rc == 0)); then
		umbrella_log "training finished"
		exit 0
	fi
	if ((rc == UMBRELLA_EXIT_STOPPED)); then
		if [[ $UMBRELLA_STOP_REQUESTED == TERM ]]; then
			# scancel, a time limit or preemption: the job is ending and cannot be requeued from
			# here (preemption with PreemptMode=REQUEUE requeues it by itself).
			umbrella_log "training stopped on SIGTERM after a complete checkpoint: not requeueing; resubmit to resume from $OUT/checkpoints"
			exit "$UMBRELLA_EXIT_STOPPED"
		fi
		if ((RESTART_COUNT >= MAX_REQUEUES)); then
			umbrella_log "training stopped after a checkpoint, but the job was already requeued $RESTART_COUNT times (MAX_REQUEUES=$MAX_REQUEUES): not requeueing; resubmit to resume from $OUT/checkpoints"
			exit "$UMBRELLA_EXIT_STOPPED"
		fi
		umbrella_log "training stopped after a complete checkpoint: requeueing (restart $((RESTART_COUNT + 1)) of at most $MAX_REQUEUES)"
		scontrol requeue "$SLURM_JOB_ID" || umbrella_die "scontrol requeue $SLURM_JOB_ID failed (is JobRequeue=1 or --requeue set?); resubmit to resume"
		exit 0
	fi
	if ((rc == UMBRELLA_EXIT_USER_ERROR)); then
		# Every rank found the same mistake in what it was given; rank 0 printed it once.
		umbrella_log "training refused to start: a user error (exit status 2); the 'error:' line above names the config key, file or flag to fix; not requeueing"
		exit "$rc"
	fi
	umbrella_report_failure "$rc"
	exit "$rc"
}
