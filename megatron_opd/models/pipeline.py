"""Forward-only passes (the teacher's; the student's log-probs before a step's updates) and the student's
forward-backward, all through megatron's pipeline schedule over a list of micro-batches. Outputs live on the
last pipeline stage: the student's final hidden states (its loss applies the output layer, fused), the
teacher's hidden states or logits. The schedule runs on megatron's global groups, or on a model's own
(`pg_collection`: a teacher in a layout of its own)."""
from typing import Callable, Optional

import torch

from megatron_opd.models.batch import TokenBatch
from megatron_opd.models.forward import per_chunk_iterators
from megatron_opd.models.head import final_hidden_states


def _run(chunks, micro_batches: list[TokenBatch], loss_of: Callable, forward_only: bool, cp_size: int,
         pg_collection=None, output_processor: Optional[Callable] = None) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    groups, pp_size = {}, None
    if pg_collection is not None:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        groups = dict(pg_collection=pg_collection, p2p_communicator=P2PCommunicator(pg_collection.pp, chunks[0].config))
        pp_size = pg_collection.pp.size()
    outputs = {} if output_processor is None else {"output_processor": output_processor}
    routed = chunks[0].config.num_moe_experts is not None

    def forward_step(data_iterator, model):
        index = next(data_iterator)
        batch = micro_batches[index]
        # A MoE model's routers leave the padding out of their losses and loads (True: a padded position).
        padding = {"padding_mask": batch.position_ids >= batch.lengths[:, None]} if routed else {}
        output = model(batch.tokens, batch.position_ids, attention_mask=None, **outputs,
                       **padding)  # [mb, s/CP, V/TP or H]
        return output, lambda out: loss_of(index, batch, out)

    # The schedule wants the whole sequence's length: it divides by CP (and TP under SP) for p2p shapes.
    return get_forward_backward_func(pp_size=pp_size)(
        forward_step_func=forward_step, data_iterator=per_chunk_iterators(chunks, list(range(len(micro_batches)))),
        model=chunks, num_microbatches=len(micro_batches), seq_length=micro_batches[0].tokens.shape[1] * cp_size,
        micro_batch_size=micro_batches[0].size, forward_only=forward_only, **groups)


@torch.no_grad()
def forward_pass(chunks, micro_batches: list[TokenBatch], keep: Callable, cp_size: int, pg_collection=None,
                 output_processor: Optional[Callable] = None) -> list:
    """keep(output, batch) -> what the loss needs, per micro-batch, on the last stage ([] elsewhere)."""
    kept = {}

    def loss_of(index, batch, output):
        kept[index] = keep(output, batch)
        return output.new_zeros(()), {}

    for chunk in chunks:
        chunk.eval()
    _run(chunks, micro_batches, loss_of, True, cp_size, pg_collection, output_processor)
    return [kept[i] for i in sorted(kept)]


def student_pass(chunks, micro_batches: list[TokenBatch], loss_share: Callable, scale: float, cp_size: int) -> list[dict]:
    """loss_share(index, hidden, batch) -> (share of the global loss, metrics), with the last stage's final
    hidden states [mb, s/CP, H]. The schedule divides each loss by the number of micro-batches and multiplies
    it by CP, and DDP averages over the DP x CP ranks; `scale` (micro-batches x DP) undoes all three, so the
    gradients are those of the sum of the shares."""
    def loss_of(index, batch, hidden):
        share, metrics = loss_share(index, hidden, batch)
        return share * scale, {name: value.detach() for name, value in metrics.items()}

    for chunk in chunks:
        chunk.train()
    return _run(chunks, micro_batches, loss_of, False, cp_size, output_processor=final_hidden_states)
