"""Worker-side helpers for tests that run real megatron-core models: build a tiny model in a layout,
and one forward-backward through megatron's schedule returning the loss and globally named grads."""
import torch

from megatron_opd.models import build_model, load_arch
from megatron_opd.models.naming import global_named_parameters
from megatron_opd.models.forward import micro_batches, per_chunk_iterators, position_ids
from megatron_opd.models.sharded_checkpoint import load_model
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel


def build_in_layout(model_dir, parallel: ParallelConfig, ckpt_dir=None, seed=1234, dtype="float32"):
    initialize_model_parallel(parallel, seed=seed)
    arch = load_arch(model_dir)
    chunks = build_model(arch, parallel, dtype=dtype)
    if ckpt_dir:
        load_model(chunks, ckpt_dir)
    return arch, chunks


def sample_tokens(vocab_size, batch=4, seq=16, seed=0):
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _true_vocab_cross_entropy(logits, labels, vocab_size):
    """Megatron's vocab-parallel CE with the padded vocabulary rows masked out, so that layouts with
    different padding (it grows with TP) compute the same loss."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    shard = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    padded = torch.arange(first, first + shard, device=logits.device) >= vocab_size
    return vocab_parallel_cross_entropy(logits.float().masked_fill(padded, float("-inf")), labels)


def loss_and_grads(chunks, tokens, vocab_size, micro_batch_size=2):
    """Mean next-token CE over micro-batches via megatron DDP + the schedule + finalize_model_grads.
    Returns (loss or None off the last stage, {global param name: grad})."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    labels = torch.roll(tokens, -1, dims=1)
    batches = micro_batches({"tokens": tokens, "labels": labels}, micro_batch_size)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["tokens"], position_ids(batch["tokens"]), attention_mask=None)

        def mean_loss(logits):
            loss = _true_vocab_cross_entropy(logits, batch["labels"], vocab_size).mean()
            return loss, {"loss": loss.detach()}

        return logits, mean_loss

    for model in wrapped:
        model.zero_grad_buffer()
    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=per_chunk_iterators(wrapped, batches), model=wrapped,
        num_microbatches=len(batches), seq_length=tokens.shape[1], micro_batch_size=micro_batch_size,
        forward_only=False)
    loss = torch.stack([r["loss"] for r in results]).mean().item() if results else None
    grads = {name: param.main_grad.detach().clone() for name, param in global_named_parameters(chunks)}
    return loss, grads
