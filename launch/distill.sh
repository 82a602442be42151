#!/usr/bin/env bash
# On-policy distillation as a SLURM batch job, on one node or many; preemption-safe (checkpoint, requeue,
# resume).
#
# Run (from the repo root, or set OPD_REPO / OPD_PYTHON):
#   sbatch launch/distill.sh student.path=... teacher.path=... data.train_files=... [more Hydra overrides]
#   sbatch --nodes=4 --gpus-per-node=8 --time=24:00:00 launch/distill.sh parallel.tensor=8 ...
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 launch/distill.sh ...   # two processes on a CPU node
# Every argument is a Hydra override for megatron_opd.train; sbatch options on the command line win over
# the #SBATCH defaults below.
#
# Layout: one srun task per node, each running torchrun, which starts the node's trainer processes and joins
# the other nodes through a c10d rendezvous whose store the first node hosts. Trainer processes per node, the
# first that is set: OPD_PROCS_PER_NODE; sbatch --ntasks-per-node=N; sbatch --ntasks=N (N / nodes, which
# must divide); the GPUs SLURM gave the node; 1. The job takes whole nodes whatever the number of tasks
# asked for: torchrun forks the processes, which share the node's CPUs and memory. Ranks come from
# torchrun's variables. The rollout engine needs no launch of its own: with rollout.engine=sglang, global
# rank 0 starts the SGLang server (megatron_opd/rollout/sglang_server.py).
#
# Files: the job log is <job name>-<job id>.log in the submit directory; checkpoints, metrics.jsonl and
# Hydra's record go to the run directory runs/<job name>-<job id>/ under the submit directory, or to
# trainer.save_dir=... if given. The job id survives a requeue, so the requeued job finds its checkpoints
# there and resumes (trainer.resume=auto).
#
# Preemption: SLURM sends SIGUSR1 to this script (--signal=B:USR1@300: 300 s before the time limit; also
# `scancel --signal=USR1 --batch <job id>`). The script touches a flag file that the trainer checks once per
# step; the trainer finishes the step, saves a checkpoint, writes <flag>.saved and exits, and the script
# requeues the job. The lead time must cover one step plus one checkpoint save; SLURM sends the signal up
# to a minute late. When SLURM itself ends the job (preemption with PreemptMode=REQUEUE, `scontrol
# requeue`, scancel, the time limit) it sends SIGTERM and, KillWait/GraceTime seconds later, SIGKILL: the
# trainer takes the SIGTERM as the same request (torchrun here ignores it), and SLURM requeues the job or
# not. A checkpoint that SIGKILL interrupts is never used (checkpoints are written to a temporary name).
#
# Environment: OPD_REPO (default: the submit directory; its .venv is used), OPD_PYTHON (default:
# $OPD_REPO/.venv/bin/python, else python3 on PATH), OPD_PROCS_PER_NODE, OPD_MASTER_ADDR (default: the
# first node's host name), OPD_MASTER_PORT (default: from the job id, so jobs sharing a node do not collide).

#SBATCH --job-name=opd-distill
#SBATCH --nodes=1
# No --ntasks-per-node here: SLURM sets SLURM_NTASKS_PER_NODE only when the user asks for a number.
#SBATCH --gpus-per-node=8
# Whole nodes, all their CPUs and memory: the trainer processes of a node share them.
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=04:00:00
# Relative to the submit directory, which always exists (a missing directory fails the job with no log).
#SBATCH --output=%x-%j.log
# A requeued job keeps writing to the same log.
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "launch/distill.sh is a SLURM batch script: submit it with sbatch (launch/local.sh runs without SLURM)" >&2
    exit 2
fi

# sbatch runs a copy of this script from its spool directory, so the repo is found from the submit
# directory, not from $0.
REPO=${OPD_REPO:-$SLURM_SUBMIT_DIR}
if [ -n "${OPD_PYTHON:-}" ]; then
    PYTHON=$OPD_PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
    PYTHON=$REPO/.venv/bin/python
else
    PYTHON=$(command -v python3) || { echo "no python: set OPD_PYTHON or OPD_REPO" >&2; exit 2; }
fi
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [ -n "${OPD_PROCS_PER_NODE:-}" ]; then
    PROCS_PER_NODE=$OPD_PROCS_PER_NODE
elif [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
    PROCS_PER_NODE=$SLURM_NTASKS_PER_NODE
elif [ -n "${SLURM_NTASKS:-}" ]; then  # set only by --ntasks (or --ntasks-per-node, handled above)
    if [ $((SLURM_NTASKS % NODES)) -ne 0 ]; then
        echo "opd: --ntasks=$SLURM_NTASKS does not divide over $NODES nodes: every node runs the same number of" \
            "trainer processes; ask for them with --ntasks-per-node=N" >&2
        exit 2
    fi
    PROCS_PER_NODE=$((SLURM_NTASKS / NODES))
else
    PROCS_PER_NODE=${SLURM_GPUS_ON_NODE:-1}
fi
MASTER_ADDR=${OPD_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${OPD_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
DEFAULT_RUN_DIR=$SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME-$SLURM_JOB_ID
RUN_DIR=$DEFAULT_RUN_DIR
for arg in "$@"; do  # the user's trainer.save_dir is the run directory; the last one wins, as in Hydra
    case $arg in trainer.save_dir=*) RUN_DIR=${arg#trainer.save_dir=} ;; esac
done

# The flag lives in the run directory, which the first node (where this script runs) sees at least.
mkdir -p "$RUN_DIR"
PREEMPT_FILE=$RUN_DIR/preempt.flag
rm -f "$PREEMPT_FILE" "$PREEMPT_FILE.saved"  # left over from the run before a requeue
export OPD_PREEMPT_FILE=$PREEMPT_FILE OPD_PREEMPT_SIGTERM=1

echo "opd: job $SLURM_JOB_ID start (restart ${SLURM_RESTART_COUNT:-0}) $(date -Is)"
echo "opd: nodes $SLURM_JOB_NODELIST ($NODES x $PROCS_PER_NODE processes), rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "opd: run dir (checkpoints, metrics) $RUN_DIR, python $PYTHON"
if [ -f "$RUN_DIR/latest" ]; then
    echo "opd: resuming from $RUN_DIR/$(cat "$RUN_DIR/latest")"
fi

ended_by_slurm=0
# shellcheck disable=SC2317  # called by the traps below
on_signal() {  # $1: the signal
    echo "opd: SIG$1 at $(date -Is): asking the trainer to checkpoint and stop"
    touch "$PREEMPT_FILE"
    if [ "$1" = TERM ]; then ended_by_slurm=1; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# The defaults come before "$@" so that the user's overrides win (Hydra keeps the last value).
# One task per node, whatever --ntasks(-per-node) the allocation was made with: torchrun forks the trainer
# processes. Each task ignores SIGUSR1 and SIGTERM (inherited through exec, and torchrun is told not to
# handle SIGTERM): torchrun would die of the first and kill the trainer on the second, whose own handlers
# see both. A failed worker still brings its node down: torchrun then stops the others, SIGKILL after
# --shutdown-timeout.
# is_host (per task, from its node's index in the step): the first node's torchrun hosts the rendezvous
# store, and only it. Left to guess, a torchrun hosts it when the endpoint matches its machine's host name or
# addresses: none does when the first node's name resolves to another interface (all wait for a store that
# nobody starts), and one that guessed so but cannot bind the port silently joins whatever listens there.
# shellcheck disable=SC2016  # expanded in each srun task, on its own node
TASK='trap "" USR1 TERM; exec "$1" -m torch.distributed.run --rdzv-conf="is_host=$((SLURM_NODEID == 0))" "${@:2}"'
srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    --kill-on-bad-exit=1 \
    bash -c "$TASK" opd-task "$PYTHON" --signals-to-handle=SIGINT,SIGHUP,SIGQUIT --shutdown-timeout=10 \
    --nnodes="$NODES" --nproc-per-node="$PROCS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    -m megatron_opd.train --config-name=distillation_trainer \
    "trainer.save_dir=$DEFAULT_RUN_DIR" trainer.resume=auto "$@" &
SRUN_PID=$!

# bash runs a trap only between commands; `wait` returns early for it, so wait again until srun is gone.
while :; do
    if wait "$SRUN_PID"; then status=0; else status=$?; fi
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [ -f "$PREEMPT_FILE.saved" ] && [ "$ended_by_slurm" = 1 ]; then
    echo "opd: trainer stopped after $(cat "$PREEMPT_FILE.saved"); SLURM is ending the job" \
        "(it requeues it if it was preempted or requeued)"
    rm -f "$PREEMPT_FILE" "$PREEMPT_FILE.saved"
    exit 0
elif [ -f "$PREEMPT_FILE.saved" ]; then
    echo "opd: trainer stopped after $(cat "$PREEMPT_FILE.saved"); requeueing job $SLURM_JOB_ID"
    rm -f "$PREEMPT_FILE" "$PREEMPT_FILE.saved"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "opd: requeue failed; submit the same command with trainer.save_dir=$RUN_DIR to resume" >&2
        exit 1
    fi
    exit 0  # not reached when the requeue ends this script, as it normally does
fi
echo "opd: job $SLURM_JOB_ID done with exit code $status $(date -Is)"
exit "$status"
