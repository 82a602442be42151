"""Megatron DDP, the distributed optimizer and learning-rate schedule for the student, and an optimizer
step that refuses non-finite gradients instead of applying them."""
import math
from dataclasses import dataclass

from megatron_opd.config import ActorConfig


def wrap_and_build_optimizer(chunks, actor: ActorConfig, total_optimizer_steps: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = chunks[0].config
    # Always the distributed optimizer (at DP=1 too): one checkpoint format, whatever the DP size. With bf16
    # weights it keeps fp32 main parameters, gradients (grad_reduce_in_fp32) and Adam state.
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    optim = actor.optim
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, clip_grad=actor.grad_clip,
        bf16=config.bf16, params_dtype=config.params_dtype, use_distributed_optimizer=True), wrapped)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(total_optimizer_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.lr_decay, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=total_optimizer_steps, wd_incr_style="constant")
    return wrapped, optimizer, scheduler


@dataclass(frozen=True)
class StepOutcome:
    applied: bool
    grad_norm: float  # the global norm before clipping; nan/inf when the update was refused for it


def optimizer_step(optimizer, clip_grad: float) -> StepOutcome:
    """Collective. megatron's chained step (prepare the gradients, global norm, clip, step), except that
    a non-finite norm refuses the update: megatron 0.19 only checks for inf/nan under an fp16 loss scaler
    and would otherwise apply a NaN update."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # a loss scaler found inf/nan
        return StepOutcome(applied=False, grad_norm=math.nan)
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return StepOutcome(applied=False, grad_norm=grad_norm)
    if clip_grad > 0:
        clip_grad_by_total_norm_fp32(optimizer.get_parameters(), clip_grad, grad_norm)
    return StepOutcome(applied=bool(optimizer.step_with_ready_grads()), grad_norm=grad_norm)
