#!/usr/bin/env bash
# On-policy distillation on this machine, without SLURM: the same trainer, started by torchrun.
#
# Run: bash launch/local.sh student.path=... teacher.path=... data.train_files=... [more Hydra overrides]
#      OPD_PROCS_PER_NODE=2 bash launch/local.sh ... parallel.tensor=2
# Every argument is a Hydra override for megatron_opd.train. Processes: OPD_PROCS_PER_NODE (default: the
# GPUs nvidia-smi lists, or 1). Checkpoints and metrics go to trainer.save_dir (default runs/local); running
# the same command again resumes from its latest checkpoint.
#
# `kill -USR1 <pid of this script>` stops the run the way a SLURM preemption does: the trainer finishes the
# step, saves a checkpoint and exits; run the command again to resume.
#
# Environment: OPD_PYTHON (default: .venv/bin/python of this repo, else python3 on PATH), OPD_PROCS_PER_NODE.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${OPD_PYTHON:-}" ]; then
    PYTHON=$OPD_PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
    PYTHON=$REPO/.venv/bin/python
else
    PYTHON=$(command -v python3) || { echo "no python: set OPD_PYTHON" >&2; exit 2; }
fi
if [ -z "${OPD_PROCS_PER_NODE:-}" ]; then
    OPD_PROCS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [ "$OPD_PROCS_PER_NODE" -gt 0 ] || OPD_PROCS_PER_NODE=1
fi
SAVE_DIR=runs/local
for arg in "$@"; do
    case $arg in trainer.save_dir=*) SAVE_DIR=${arg#trainer.save_dir=} ;; esac
done

mkdir -p "$SAVE_DIR"
PREEMPT_FILE=$SAVE_DIR/preempt.flag
rm -f "$PREEMPT_FILE" "$PREEMPT_FILE.saved"
export OPD_PREEMPT_FILE=$PREEMPT_FILE
trap 'echo "opd: SIGUSR1: asking the trainer to checkpoint and stop"; touch "$PREEMPT_FILE"' USR1

# torchrun dies of SIGUSR1; the subshell's ignore is inherited through exec (the trainer installs its own
# handler). --standalone: a rendezvous on a free local port.
(trap '' USR1; exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$OPD_PROCS_PER_NODE" \
    -m megatron_opd.train --config-name=distillation_trainer trainer.save_dir=runs/local "$@") &
PID=$!
while :; do
    if wait "$PID"; then status=0; else status=$?; fi
    kill -0 "$PID" 2>/dev/null || break
done
if [ -f "$PREEMPT_FILE.saved" ]; then
    echo "opd: stopped after $(cat "$PREEMPT_FILE.saved"); run the same command again to resume"
    rm -f "$PREEMPT_FILE" "$PREEMPT_FILE.saved"
fi
exit "$status"
