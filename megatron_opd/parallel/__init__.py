"""Distributed init (torchrun and SLURM), the parallel layout, megatron's parallel state, the CPU layer."""
from megatron_opd.parallel.config import ParallelConfig, ParallelConfigError, transformer_engine_available
from megatron_opd.parallel.distributed import (
    destroy, free_port, init_distributed, initialize_model_parallel, tp_group)
from megatron_opd.parallel.launch_env import LaunchEnv, expand_hostlist, read_launch_env

__all__ = [
    "LaunchEnv", "ParallelConfig", "ParallelConfigError", "destroy", "expand_hostlist", "free_port",
    "init_distributed", "initialize_model_parallel", "read_launch_env", "tp_group",
    "transformer_engine_available",
]
