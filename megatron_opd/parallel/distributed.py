"""Process-group and megatron parallel-state set-up. The only holder of global parallel state: the
default process group, megatron's groups, and the device this process was initialised on."""
import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.parallel import cpu_compat
from megatron_opd.parallel.config import ParallelConfig, transformer_engine_available
from megatron_opd.parallel.device import DeviceError, resolve_device
from megatron_opd.parallel.dims import ParallelDims
from megatron_opd.parallel.launch_env import LaunchEnv, read_launch_env

# Long enough for the ranks that wait on rank 0 while it generates a step's rollouts (trainer's
# `trainer.collective_timeout_s` overrides it); a dead peer still fails within it instead of hanging.
DEFAULT_TIMEOUT_S = 1800

_device: Optional[torch.device] = None
_timeout_s: float = DEFAULT_TIMEOUT_S


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def current_device() -> torch.device:
    """The device the process group was initialised on (before that: the CPU)."""
    return _device if _device is not None else torch.device("cpu")


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, launch: Optional[LaunchEnv] = None,
                     device: Optional[torch.device] = None) -> LaunchEnv:
    """Join the job's default process group on `device` (default: CUDA when usable, else the CPU) with
    NCCL or gloo to match, and a bounded timeout, so a missing peer is an error rather than a hang."""
    global _device, _timeout_s
    launch = launch or read_launch_env()
    device = device if device is not None else resolve_device("auto", launch.local_rank, announce=False)
    if dist.is_initialized():
        if device != current_device():
            raise DeviceError(f"the process group already runs on {current_device()}, not {device}")
        return launch
    if device.type == "cpu":
        cpu_compat.apply()
    else:
        torch.cuda.set_device(device)
    port = launch.master_port
    if launch.source == "single" and "MASTER_PORT" not in os.environ:
        port = free_port()
    dist.init_process_group(
        backend=backend_for(device), init_method=f"tcp://{launch.master_addr}:{port}",
        rank=launch.rank, world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    _device, _timeout_s = device, timeout_s
    return launch


def initialize_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> ParallelDims:
    """Megatron's TP/PP/CP/DP groups (and its expert EP/expert-TP/expert-DP groups) for `parallel`, plus its
    per-rank RNG streams."""
    from megatron.core import parallel_state, tensor_parallel

    parallel.check_world(dist.get_world_size())
    device = current_device()
    parallel.check_backend(device.type == "cuda" and transformer_engine_available())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
        distributed_timeout_minutes=max(1, round(_timeout_s / 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelDims.from_parallel_state(parallel, device)


def destroy() -> None:
    global _device
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _device = None


def tp_group():
    """Megatron's TP group when model parallel is initialised, else None (a single shard)."""
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None
