"""Stop a run cleanly when the cluster is about to take its nodes away.

A stop is asked for by a SIGUSR1 to any rank, or by the flag file named in `OPD_PREEMPT_FILE` (which
`launch/distill.sh` touches when SLURM signals its batch shell: torchrun would die of a SIGUSR1, so the
signal itself is not passed down). With `OPD_PREEMPT_SIGTERM=1` (distill.sh sets it) a SIGTERM asks for a
stop too: that is how SLURM ends a job it preempts, requeues (`scontrol requeue`), cancels or times out,
KillWait / GraceTime seconds before its SIGKILL; that script's torchrun ignores SIGTERM and leaves it to us.
The loop asks `requested()` once per step; all ranks agree through a MAX all-reduce, so they save the same
checkpoint and stop after the same step. After that checkpoint the loop calls `saved(step)`, which writes
`<flag file>.saved`: the batch script's cue to requeue the job rather than end it.
"""
import json
import os
import signal
import sys
import threading
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.atomic import write_text

PREEMPT_FILE_ENV = "OPD_PREEMPT_FILE"
SIGTERM_ENV = "OPD_PREEMPT_SIGTERM"
SAVED_SUFFIX = ".saved"


def _checks_files() -> bool:
    """One process per node looks at the file: the batch shell's node holds it even without a shared file
    system, and torchrun's rendezvous does not promise that global rank 0 runs there."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))) == 0


class Preemption:
    def __init__(self, flag_file: Optional[str] = None, on_sigterm: Optional[bool] = None):
        self.flag_file = (flag_file if flag_file is not None else os.environ.get(PREEMPT_FILE_ENV)) or None
        if on_sigterm is None:
            on_sigterm = os.environ.get(SIGTERM_ENV) == "1"
        self.signalled = False
        self._previous = {}
        signals = (signal.SIGUSR1, signal.SIGTERM) if on_sigterm else (signal.SIGUSR1,)
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank was signalled or saw the flag file. `device`: the
        process group's (a CUDA tensor for NCCL)."""
        local = self.signalled or bool(self.flag_file and _checks_files() and os.path.exists(self.flag_file))
        if not dist.is_initialized():
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def saved(self, step: int, checkpoint_path: str) -> None:
        """After the checkpoint is complete: say so to whoever asked, then the loop returns."""
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            print(f"preemption: checkpoint {checkpoint_path} saved after step {step}; stopping (a restart with "
                  f"trainer.resume=auto continues from there)", file=sys.stderr, flush=True)
        if self.flag_file and _checks_files():
            # One writer per node; on a shared file system they race, so each its own temporary name.
            write_text(self.flag_file + SAVED_SUFFIX, json.dumps({"step": step, "checkpoint": checkpoint_path}),
                       suffix=f".{os.getpid()}.tmp")

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
        self._previous = {}
