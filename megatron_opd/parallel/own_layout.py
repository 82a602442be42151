"""A second layout over the run's ranks (a teacher in a layout of its own, `teacher.parallel`): its groups,
built with megatron's HyperCommGrid in megatron's own order (tp-cp-dp-pp; a mixture-of-experts model's experts
over a second grid, expert_tensor-ep-expert_dp-pp, whose pipeline stages are the same ranks), as a ParallelDims
whose `pg_collection` its models and pipeline schedule take instead of megatron's global groups. Without context
parallelism: such a layout runs whole sequences."""
import torch.distributed as dist

from megatron_opd.parallel.config import ParallelConfig
from megatron_opd.parallel.dims import ParallelDims


def _groups(config: ParallelConfig, world_size: int):
    """megatron's ProcessGroupCollection for `config` over all ranks (collective: every rank creates every group)."""
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    dp = world_size // (config.tensor * config.pipeline)
    grid = HyperCommGrid([config.tensor, 1, dp, config.pipeline], ["tp", "cp", "dp", "pp"])
    groups = ProcessGroupCollection()
    for name, dims in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp"), ("mp", ["tp", "pp"]),
                       ("tp_cp", ["tp", "cp"]), ("dp_cp", ["cp", "dp"]), ("tp_dp_cp", ["tp", "cp", "dp"])):
        setattr(groups, name, grid.create_pg(dims))
    groups.intra_dp_cp = groups.dp_cp
    experts = HyperCommGrid([config.expert_tensor_size, config.expert, world_size // config.pipeline //
                             (config.expert_tensor_size * config.expert), config.pipeline], ["tp", "ep", "dp", "pp"])
    for name, dims in (("ep", "ep"), ("expt_tp", "tp"), ("expt_dp", "dp"), ("tp_ep", ["tp", "ep"]),
                       ("tp_ep_pp", ["tp", "ep", "pp"])):
        setattr(groups, name, experts.create_pg(dims))
    groups.expt_dp_gtp_remat = groups.expt_dp
    # A tied output layer on the last stage is a copy of the first stage's embedding: its group joins both.
    embedding = None
    for stages in grid.get_rank_enum("pp"):
        group = dist.new_group(sorted({stages[0], stages[-1]}))
        if dist.get_rank() in stages:
            embedding = group
    groups.embd = embedding
    groups.pos_embd = None  # rotary positions: no position-embedding table to share
    return groups


def own_layout_dims(config: ParallelConfig, run: ParallelDims) -> ParallelDims:
    """Collective. This rank's place in `config` laid over the ranks (and device) of `run`."""
    if config.context != 1:
        raise ValueError(f"a layout of its own runs whole sequences: context={config.context} must be 1")
    config.check_world(run.world_size)
    groups = _groups(config, run.world_size)
    pp_rank = groups.pp.rank()
    return ParallelDims(config=config, device=run.device, world_size=run.world_size, rank=run.rank,
                        tp_rank=groups.tp.rank(), pp_rank=pp_rank, cp_rank=0, dp_rank=groups.dp.rank(),
                        tp_group=groups.tp, pp_group=groups.pp, cp_group=groups.cp, dp_group=groups.dp,
                        is_first_stage=pp_rank == 0, is_last_stage=pp_rank == config.pipeline - 1,
                        pg_collection=groups)
