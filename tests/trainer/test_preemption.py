"""megatron_opd.trainer.preemption: a signal or the flag file asks for a stop, all ranks agree, the
`.saved` marker tells the launcher, and the previous signal handlers come back."""
import json
import os
import signal

import torch

from megatron_opd.trainer.preemption import SAVED_SUFFIX, Preemption
from tests.conftest import run_distributed

CPU = torch.device("cpu")


def test_flag_file_and_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    flag = tmp_path / "preempt.flag"
    preemption = Preemption(str(flag), on_sigterm=False)
    try:
        assert not preemption.requested(CPU)
        flag.touch()
        assert preemption.requested(CPU)
        preemption.saved(7, "/ckpt/step_000007")
        assert json.loads((tmp_path / ("preempt.flag" + SAVED_SUFFIX)).read_text()) == \
            {"step": 7, "checkpoint": "/ckpt/step_000007"}
    finally:
        preemption.close()


def test_signals_set_the_request_and_handlers_are_restored():
    before_usr1, before_term = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    preemption = Preemption(flag_file="", on_sigterm=True)
    try:
        assert not preemption.requested(CPU)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested(CPU)
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGUSR1) == before_usr1 and signal.getsignal(signal.SIGTERM) == before_term

    preemption = Preemption(flag_file="", on_sigterm=False)  # SIGTERM is left alone without the opt-in
    try:
        assert signal.getsignal(signal.SIGTERM) == before_term
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.requested(CPU)
    finally:
        preemption.close()


def _agree(rank, world_size, flag_path, signalled_rank):
    preemption = Preemption(flag_path, on_sigterm=False)
    preemption.signalled = rank == signalled_rank
    answer = preemption.requested(CPU)
    preemption.close()
    return answer


def test_all_ranks_agree(tmp_path):
    flag = tmp_path / "preempt.flag"
    assert run_distributed(_agree, 2, str(flag), None) == [False, False]
    assert run_distributed(_agree, 2, str(flag), 1) == [True, True]  # one signalled rank stops everyone
    flag.touch()  # only LOCAL_RANK 0 looks at the file; rank 1 learns it from the all-reduce
    assert run_distributed(_agree, 2, str(flag), None) == [True, True]
