"""Trainer checkpoints: model and optimizer (megatron torch_dist), plus per rank the LR schedule, RNG
states, data-sampler state, step and the step's metrics line. Written to `step_N.tmp` and renamed, then
`latest` is replaced atomically: a crash at any point leaves the previous checkpoint intact and `latest`
pointing at it.

A checkpoint resumes at another data-parallel size with the same TP, PP and CP: the optimizer state is
resharded along DP (`dp_reshardable`), and `layout.json` maps each new rank to the saved rank with its
(pipeline, tensor, context) coordinates, whose extras it loads."""
import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.atomic import write_text
from megatron_opd.models.sharded_checkpoint import check_loaded_state, use_forked_writer_queue
from megatron_opd.parallel import HOST, ParallelDims

LATEST = "latest"
LAYOUT = "layout.json"
# The distributed optimizer's state in bucket space: saved and loaded by every rank in parallel, and
# resharded along DP on load. megatron-core 0.19's default (fully_sharded_model_space) needs flattened
# ShardedTensors, which its own torch_dist writer refuses.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run; the message says why and what to do."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sharded(ddp_chunks, optimizer, loading: bool) -> dict:
    model = {f"chunk{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(ddp_chunks)}
    return {"model": model,
            "optimizer": optimizer.sharded_state_dict(model, is_loading=loading, metadata=OPTIMIZER_FORMAT)}


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain containers and tensors only, so the file loads with torch.load(weights_only=True).
    return {"python": random.getstate(), "numpy": (kind, torch.as_tensor(keys.copy(), device=HOST), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, gauss = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _coordinates(dims: ParallelDims) -> list[int]:
    return [dims.pp_rank, dims.tp_rank, dims.cp_rank, dims.dp_rank]


def save(save_dir: str, step: int, ddp_chunks, optimizer, scheduler, extra: dict, dims: ParallelDims) -> str:
    """Collective. `extra` (plain values) is kept per rank and returned by `load`."""
    from megatron.core import dist_checkpointing

    use_forked_writer_queue()
    _prime_adam_state(optimizer)  # an optimizer whose every update was refused has no state yet
    final = os.path.join(save_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if dims.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "model"))
    _barrier()
    dist_checkpointing.save(_sharded(ddp_chunks, optimizer, loading=False), os.path.join(tmp, "model"))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra},
               os.path.join(tmp, f"extra_rank{dims.rank}.pt"))
    everyone = [None] * dims.world_size
    dist.all_gather_object(everyone, _coordinates(dims))
    if dims.rank == 0:
        with open(os.path.join(tmp, LAYOUT), "w") as f:
            json.dump({**_sizes(dims), "data": dims.dp_size, "ranks": everyone}, f)
    _barrier()
    if dims.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text(os.path.join(save_dir, LATEST), os.path.basename(final))
    _barrier()
    return final


def find(save_dir: str, resume: str) -> Optional[str]:
    """The checkpoint to resume from: `resume` is auto | never | a checkpoint path."""
    if resume == "never":
        return None
    if resume != "auto":
        if not os.path.isfile(os.path.join(resume, LAYOUT)):
            raise ResumeError(f"trainer.resume={resume}: not a complete trainer checkpoint (no {LAYOUT})")
        return resume
    pointer = os.path.join(save_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(save_dir, f.read().strip())


def _sizes(dims: ParallelDims) -> dict:
    """The sizes a resume keeps. Expert parallelism too: the optimizer's expert state is sharded over the expert
    data-parallel ranks, which another expert size regroups."""
    return {"tensor": dims.tp_size, "pipeline": dims.config.pipeline, "context": dims.cp_size,
            "expert": dims.config.expert, "expert_tensor": dims.config.expert_tensor_size}


def _extras_rank(path: str, dims: ParallelDims) -> int:
    """The saved rank whose extras this rank loads: same pipeline/tensor/context coordinates, same DP rank
    when the checkpoint has it (else DP rank 0: DP ranks hold the same schedule and sampler)."""
    with open(os.path.join(path, LAYOUT)) as f:
        layout = json.load(f)
    now = _sizes(dims)
    # Written before expert parallelism: EP=1, experts cut by the tensor size.
    saved = {"expert": 1, "expert_tensor": layout["tensor"], **layout}
    saved = {key: saved[key] for key in now}
    if saved != now:
        raise ResumeError(f"{path}: written with parallel.{saved}, this run has parallel.{now}; a checkpoint "
                          f"resumes with the same tensor, pipeline, context and expert sizes (the DP size may "
                          f"differ)")
    mine = _coordinates(dims)
    by_coordinates = {tuple(coords): rank for rank, coords in enumerate(layout["ranks"])}
    return by_coordinates.get(tuple(mine), by_coordinates[(*mine[:3], 0)])


def _torch_adams(optimizer) -> list:
    """The torch.optim.Adam(W) instances inside megatron's (chained, distributed) optimizer. TE's FusedAdam,
    the GPU path, keeps its step in the param groups and needs none of the repairs below."""
    inners = [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [adam for adam in inners if isinstance(adam, torch.optim.Adam)]


def _prime_adam_state(optimizer) -> None:
    """megatron 0.19's DistributedOptimizer.state_dict() reads the step of torch Adam's per-parameter state,
    which exists only after a first update: a resumed optimizer has not stepped yet, and neither has one whose
    every update was refused. Zeros and step 0 are exactly a fresh Adam's state; a load overwrites them."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.zeros((), dtype=torch.float32, device=HOST),
                                         "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


def _restore_adam_steps(optimizer) -> None:
    """megatron 0.19 restores torch Adam's step into the param groups but leaves the per-parameter steps,
    which Adam's bias correction reads, at the placeholder's 0: the first resumed update would differ."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                adam.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32, device=HOST)


@torch.no_grad()  # the optimizer load copies into views of the (leaf) parameters
def load(path: str, ddp_chunks, optimizer, scheduler, dims: ParallelDims) -> dict:
    """Collective. Restores model, optimizer, schedule and RNG, checking that every key fits; returns the
    saved extras (step, sampler, metrics...)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    source_rank = _extras_rank(path, dims)
    _prime_adam_state(optimizer)
    state = dist_checkpointing.load(_sharded(ddp_chunks, optimizer, loading=True), os.path.join(path, "model"),
                                    strict=StrictHandling.RAISE_ALL)
    for i, chunk in enumerate(ddp_chunks):
        check_loaded_state(chunk.module, state["model"][f"chunk{i}"], path)
    optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer)
    extra = torch.load(os.path.join(path, f"extra_rank{source_rank}.pt"), weights_only=True,
                       map_location="cpu")
    scheduler.load_state_dict(extra.pop("scheduler"))
    set_rng_state(extra.pop("rng"))
    return extra
