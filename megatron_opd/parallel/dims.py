"""`ParallelDims`: the run's layout and this rank's place in it — sizes, ranks, megatron's process groups
and the one device — read once after megatron's parallel state is set up. The trainer and its parts ask
it instead of `parallel_state` or `torch.cuda`."""
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_opd.parallel.config import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    config: ParallelConfig
    device: torch.device
    world_size: int
    rank: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int  # among the ranks with different sequences (CP ranks share theirs)
    tp_group: Any
    pp_group: Any
    cp_group: Any
    dp_group: Any  # data parallel without CP: the ranks holding different sequences
    is_first_stage: bool
    is_last_stage: bool
    # megatron's ProcessGroupCollection of a layout of its own (parallel/own_layout.py), which its models and
    # schedule take; None: megatron's global groups
    pg_collection: Any = None
    # Among the ranks holding the same experts (mixture-of-experts); those at 0 hold every expert between them,
    # with their expert-parallel peers. Without experts it is the DP x CP rank: 0 where dp_rank and cp_rank are.
    expert_dp_rank: int = 0

    @classmethod
    def from_parallel_state(cls, config: ParallelConfig, device: torch.device) -> "ParallelDims":
        from megatron.core import parallel_state as ps

        return cls(config=config, device=device, world_size=dist.get_world_size(), rank=dist.get_rank(),
                   tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                   cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                   tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
                   cp_group=ps.get_context_parallel_group(), dp_group=ps.get_data_parallel_group(),
                   is_first_stage=ps.is_pipeline_first_stage(), is_last_stage=ps.is_pipeline_last_stage(),
                   expert_dp_rank=ps.get_expert_data_parallel_rank())

    @property
    def dp_size(self) -> int:
        return self.world_size // self.config.model_parallel_size

    @property
    def cp_size(self) -> int:
        return self.config.context

    @property
    def tp_size(self) -> int:
        return self.config.tensor

    @property
    def counts_metrics(self) -> bool:
        """One rank of each TP group on the last stage holds this rank's share of a step's metrics."""
        return self.is_last_stage and self.tp_rank == 0

    def tensor(self, data: Sequence, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
