"""Where the teacher's shards live. In the student's layout (the default) the teacher uses megatron's global
groups and the student's micro-batches. In a layout of its own (`teacher.parallel.{tensor,pipeline}`) it
gets its own groups over the same ranks, built with megatron's HyperCommGrid (order tp-cp-dp-pp, as
megatron's own), and takes its own share of each step's sequences (data parallel over what is left)."""
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from megatron_opd.parallel import ParallelConfig, ParallelDims


@dataclass(frozen=True)
class TeacherPlace:
    config: ParallelConfig  # the teacher's layout
    colocated: bool  # the student's layout: its groups and micro-batches, no exchange of outputs
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    dp_size: int
    tp_group: Any
    pg_collection: Optional[Any]  # megatron's ProcessGroupCollection; None: megatron's global groups

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.config.pipeline - 1

    @property
    def holds_outputs(self) -> bool:
        """One rank per copy of each output: its last stage, TP rank 0 (and CP rank 0)."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0


def teacher_layout(cfg) -> ParallelConfig:
    """teacher.parallel of an OPDConfig, where unset the student's; the student's own ParallelConfig (CP
    included) when the teacher is co-located."""
    own = cfg.teacher.parallel
    if own.tensor in (None, cfg.parallel.tensor) and own.pipeline in (None, cfg.parallel.pipeline):
        return cfg.parallel
    return ParallelConfig(tensor=own.tensor or cfg.parallel.tensor, pipeline=own.pipeline or cfg.parallel.pipeline)


def _own_groups(config: ParallelConfig, world_size: int):
    """megatron's ProcessGroupCollection for `config` over all ranks (collective: every rank creates every group)."""
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    dp = world_size // (config.tensor * config.pipeline)
    grid = HyperCommGrid([config.tensor, 1, dp, config.pipeline], ["tp", "cp", "dp", "pp"])
    groups = ProcessGroupCollection()
    for name, dims in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"), ("mp", ["tp", "pp"]),
                       ("tp_cp", ["tp", "cp"]), ("dp_cp", ["cp", "dp"])):
        setattr(groups, name, grid.create_pg(dims))
    groups.intra_dp_cp = groups.dp_cp
    # A tied output layer on the last stage is a copy of the first stage's embedding: its group joins both.
    embedding = None
    for stages in grid.get_rank_enum("pp"):
        group = dist.new_group(sorted({stages[0], stages[-1]}))
        if dist.get_rank() in stages:
            embedding = group
    groups.embd = embedding
    groups.pos_embd = None  # rotary positions: no position-embedding table to share
    return groups


def teacher_place(student: ParallelDims, tensor: Optional[int], pipeline: Optional[int]) -> TeacherPlace:
    """Collective when the teacher's layout differs from the student's (its groups are created)."""
    config = ParallelConfig(tensor=tensor or student.tp_size, pipeline=pipeline or student.config.pipeline)
    if (config.tensor, config.pipeline) == (student.tp_size, student.config.pipeline):
        return TeacherPlace(student.config, True, student.tp_rank, student.pp_rank, student.dp_rank,
                            student.cp_rank, student.dp_size, student.tp_group, None)
    config.check_world(student.world_size)
    groups = _own_groups(config, student.world_size)
    return TeacherPlace(config, False, groups.tp.rank(), groups.pp.rank(), groups.dp.rank(), 0,
                        config.data_parallel_size(student.world_size), groups.tp, groups)
