"""Trainer checkpoints: model and optimizer (megatron torch_dist), plus per rank the LR schedule, RNG
states, data-sampler state and step. Written to `step_N.tmp` and renamed, then `latest` is replaced
atomically: a crash at any point leaves the previous checkpoint intact and `latest` pointing at it."""
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.models.sharded_checkpoint import use_forked_writer_queue

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# The distributed optimizer's state in bucket space: saved and loaded by every rank in parallel, and
# resharded along DP on load. megatron-core 0.19's default (fully_sharded_model_space) needs flattened
# ShardedTensors, which its own torch_dist writer refuses.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded(ddp_chunks, optimizer, loading: bool) -> dict:
    model = {f"chunk{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(ddp_chunks)}
    return {"model": model,
            "optimizer": optimizer.sharded_state_dict(model, is_loading=loading, metadata=OPTIMIZER_FORMAT)}


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save(save_dir: str, step: int, ddp_chunks, optimizer, scheduler, extra: dict) -> str:
    """Collective."""
    from megatron.core import dist_checkpointing
    use_forked_writer_queue()
    final = os.path.join(save_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "model"))
    _barrier()
    dist_checkpointing.save(_sharded(ddp_chunks, optimizer, loading=False), os.path.join(tmp, "model"))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra},
               os.path.join(tmp, f"extra_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(save_dir, LATEST + ".tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(save_dir, LATEST + ".tmp"), os.path.join(save_dir, LATEST))
    _barrier()
    return final


def find(save_dir: str, resume: str) -> Optional[str]:
    """The checkpoint to resume from: `resume` is auto | never | a checkpoint path."""
    if resume == "never":
        return None
    if resume != "auto":
        if not os.path.isfile(os.path.join(resume, f"extra_rank{_rank()}.pt")):
            raise FileNotFoundError(f"trainer.resume={resume}: not a complete trainer checkpoint")
        return resume
    pointer = os.path.join(save_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(save_dir, f.read().strip())


def _prime_adam_state(optimizer) -> None:
    """megatron 0.19's DistributedOptimizer.state_dict() reads the step of torch Adam's per-parameter state,
    which exists only after a first step (TE's FusedAdam keeps it in the param groups instead); a resumed
    optimizer has not stepped yet. Zeros and step 0 stand in until the checkpoint overwrites them."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = inner.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.zeros((), dtype=torch.float32, device="cpu"),
                                         "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


@torch.no_grad()  # the optimizer load copies into views of the (leaf) parameters
def load(path: str, ddp_chunks, optimizer, scheduler) -> dict:
    """Collective. Restores model, optimizer, schedule and RNG; returns the saved extras (step, sampler...)."""
    from megatron.core import dist_checkpointing

    _prime_adam_state(optimizer)
    state = dist_checkpointing.load(_sharded(ddp_chunks, optimizer, loading=True), os.path.join(path, "model"))
    for i, chunk in enumerate(ddp_chunks):
        chunk.module.load_state_dict(state["model"][f"chunk{i}"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    extra = torch.load(os.path.join(path, f"extra_rank{_rank()}.pt"), weights_only=False)
    scheduler.load_state_dict(extra.pop("scheduler"))
    set_rng_state(extra.pop("rng"))
    return extra
