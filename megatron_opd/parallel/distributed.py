"""Process-group and megatron parallel-state set-up. The only holder of global parallel state."""
import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.parallel import cpu_compat
from megatron_opd.parallel.config import ParallelConfig
from megatron_opd.parallel.launch_env import LaunchEnv, read_launch_env

DEFAULT_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, launch: Optional[LaunchEnv] = None) -> LaunchEnv:
    """Join the job's default process group (NCCL on GPUs, gloo otherwise) with a bounded timeout,
    so a missing peer is an error rather than a hang."""
    cpu_compat.apply()
    launch = launch or read_launch_env()
    if dist.is_initialized():
        return launch
    port = launch.master_port
    if launch.source == "single" and "MASTER_PORT" not in os.environ:
        port = free_port()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend(), init_method=f"tcp://{launch.master_addr}:{port}",
        rank=launch.rank, world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return launch


def initialize_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Megatron's TP/PP/CP/DP groups for `parallel`, plus its per-rank RNG streams."""
    from megatron.core import parallel_state, tensor_parallel

    parallel.check_world(dist.get_world_size())
    parallel.check_backend()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_group():
    """Megatron's TP group when model parallel is initialised, else None (a single shard)."""
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None
