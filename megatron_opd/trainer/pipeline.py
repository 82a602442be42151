"""The teacher's forward-only pass and the student's forward-backward, both through megatron's pipeline
schedule over a list of micro-batches. Outputs live on the last pipeline stage."""
from typing import Callable

import torch

from megatron_opd.models.forward import per_chunk_iterators
from megatron_opd.trainer.batch import TokenBatch


def _run(chunks, micro_batches: list[TokenBatch], loss_of: Callable, forward_only: bool, cp_size: int) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        index = next(data_iterator)
        batch = micro_batches[index]
        logits = model(batch.tokens, batch.position_ids, attention_mask=None)  # [mb, s/CP, V/TP]
        return logits, lambda output: loss_of(index, batch, output)

    # The schedule wants the whole sequence's length: it divides by CP (and TP under SP) for p2p shapes.
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=per_chunk_iterators(chunks, list(range(len(micro_batches)))),
        model=chunks, num_microbatches=len(micro_batches), seq_length=micro_batches[0].tokens.shape[1] * cp_size,
        micro_batch_size=micro_batches[0].size, forward_only=forward_only)


@torch.no_grad()
def teacher_pass(chunks, micro_batches: list[TokenBatch], keep: Callable, cp_size: int) -> list:
    """keep(logits, batch) -> what the loss needs, per micro-batch, on the last stage ([] elsewhere)."""
    kept = {}

    def loss_of(index, batch, logits):
        kept[index] = keep(logits, batch)
        return logits.new_zeros(()), {}

    for chunk in chunks:
        chunk.eval()
    _run(chunks, micro_batches, loss_of, forward_only=True, cp_size=cp_size)
    return [kept[i] for i in sorted(kept)]


def student_pass(chunks, micro_batches: list[TokenBatch], loss_share: Callable, scale: float, cp_size: int) -> list[dict]:
    """loss_share(index, logits, batch) -> (share of the global loss, metrics). The schedule divides each
    loss by the number of micro-batches and multiplies it by CP, and DDP averages over the DP x CP ranks;
    `scale` (micro-batches x DP) undoes all three, so the gradients are those of the sum of the shares."""
    def loss_of(index, batch, logits):
        share, metrics = loss_share(index, logits, batch)
        return share * scale, {name: value.detach() for name, value in metrics.items()}

    for chunk in chunks:
        chunk.train()
    return _run(chunks, micro_batches, loss_of, forward_only=False, cp_size=cp_size)
