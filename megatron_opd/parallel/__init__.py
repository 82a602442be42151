"""Distributed init (torchrun and SLURM), the parallel layout and the run's device, megatron's parallel
state, the CPU layer."""
from megatron_opd.parallel.config import (
    CP_COMM_TYPES, ParallelConfig, ParallelConfigError, transformer_engine_available, transformer_engine_problem)
from megatron_opd.parallel.device import DEVICE_KINDS, HOST, DeviceError, resolve_device
from megatron_opd.parallel.dims import ParallelDims
from megatron_opd.parallel.distributed import (
    current_device, destroy, free_port, init_distributed, initialize_model_parallel, tp_group)
from megatron_opd.parallel.launch_env import LaunchEnv, expand_hostlist, read_launch_env

__all__ = [
    "CP_COMM_TYPES", "DEVICE_KINDS", "DeviceError", "HOST", "LaunchEnv", "ParallelConfig", "ParallelConfigError",
    "ParallelDims", "current_device", "destroy", "expand_hostlist", "free_port", "init_distributed",
    "initialize_model_parallel", "read_launch_env", "resolve_device", "tp_group", "transformer_engine_available",
    "transformer_engine_problem",
]
