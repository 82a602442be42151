"""Real process groups on forked gloo workers: init from SLURM's environment, megatron's groups for a
layout, the CPU layer, and the runner's failure modes (exceptions surface, hangs time out)."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_opd.parallel import ParallelConfig, destroy, free_port, init_distributed, initialize_model_parallel
from megatron_opd.parallel.local_group import WorkerError, run_local
from tests.conftest import run_distributed


def _rejoin_from_slurm_env(rank, world_size, port):
    destroy()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        os.environ.pop(key)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world_size), SLURM_LOCALID=str(rank),
                      SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
    launch = init_distributed(timeout_s=60)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    return launch.source, dist.get_backend(), total.item()


def test_init_from_slurm_environment():
    results = run_distributed(_rejoin_from_slurm_env, 2, free_port())
    assert results == [("slurm", "gloo", 3.0), ("slurm", "gloo", 3.0)]


def _group_sizes(rank, world_size, parallel):
    from megatron.core import parallel_state as ps

    initialize_model_parallel(parallel)
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_data_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank())


def test_megatron_groups_follow_the_layout():
    results = run_distributed(_group_sizes, 4, ParallelConfig(tensor=2))
    assert [r[:3] for r in results] == [(2, 1, 2)] * 4
    assert sorted(r[3] for r in results) == [0, 0, 1, 1]
    results = run_distributed(_group_sizes, 4, ParallelConfig(tensor=2, pipeline=2))
    assert sorted((r[3], r[4]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def _layout_larger_than_world(rank, world_size):
    initialize_model_parallel(ParallelConfig(tensor=4))


def test_layout_that_does_not_fit_the_world_fails_with_the_message():
    with pytest.raises(WorkerError, match=r"world size 2 is not divisible by tensor\*pipeline\*context"):
        run_distributed(_layout_larger_than_world, 2)


def _cpu_layer(rank, world_size):
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer.utils import get_default_causal_mask

    from megatron_opd.parallel import cpu_compat

    in_megatron = clip_grads.torch.zeros(1, device="cuda"), get_default_causal_mask(3), torch.ones(2).cuda()
    try:  # the project's own code gets no fallback: a CUDA tensor it asks for on a CPU run is an error
        torch.zeros(2, device="cuda")
        own = "made"
    except (RuntimeError, AssertionError):
        own = "refused"
    return (cpu_compat.is_active(), [t.device.type for t in in_megatron], torch.ones(1).type(), own,
            torch.cuda.current_device())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is off when CUDA is present")
def test_cpu_layer_is_applied_in_workers():
    assert run_distributed(_cpu_layer, 1) == [(True, ["cpu"] * 3, "torch.cuda.FloatTensor", "refused", "cpu")]


def _missing_peer(rank, world_size, port):
    destroy()
    os.environ.update(WORLD_SIZE="2", MASTER_PORT=str(port))
    started = time.monotonic()
    try:
        init_distributed(timeout_s=3)
    except Exception as err:
        return type(err).__name__, time.monotonic() - started
    return "joined", 0.0


def test_missing_peer_fails_within_the_timeout():
    outcome, waited = run_distributed(_missing_peer, 1, free_port())[0]
    assert outcome != "joined" and waited < 30


def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _hang_on_rank0(rank, world_size):
    if rank == 0:
        dist.barrier()  # rank 1 never arrives
    else:
        time.sleep(60)


def test_worker_exception_surfaces_with_its_traceback():
    with pytest.raises(WorkerError, match=r"(?s)failed on rank 1.*ValueError: boom on rank 1"):
        run_distributed(_raise_on_rank1, 2)


def test_hung_collective_times_out_instead_of_hanging():
    started = time.monotonic()
    with pytest.raises((TimeoutError, WorkerError)):
        run_local(_hang_on_rank0, 2, timeout_s=4)
    assert time.monotonic() - started < 20
