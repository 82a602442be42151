"""Forward passes through megatron's pipeline schedule for evaluation: full-vocabulary logits of a batch."""
from typing import Optional

import torch


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def micro_batches(tensors: dict, micro_batch_size: int) -> list[dict]:
    total = next(iter(tensors.values())).shape[0]
    if total % micro_batch_size:
        raise ValueError(f"batch of {total} rows does not split into micro-batches of {micro_batch_size}")
    return [{k: v[i:i + micro_batch_size] for k, v in tensors.items()} for i in range(0, total, micro_batch_size)]


def per_chunk_iterators(chunks, batches: list):
    """Megatron's schedules take one iterator per virtual stage (each consumes every micro-batch)."""
    return [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)


@torch.no_grad()
def full_logits(chunks, tokens: torch.Tensor, micro_batch_size: Optional[int] = None,
                vocab_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """Logits [b, s, V] gathered over TP (float32), on the last pipeline stage; None on other stages.
    `vocab_size` drops megatron's padded rows."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    for chunk in chunks:
        chunk.eval()
    micro_batch_size = micro_batch_size or tokens.shape[0]
    batches = micro_batches({"tokens": tokens}, micro_batch_size)
    gathered = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], position_ids(batch["tokens"]), attention_mask=None)

        def collect(logits):
            gathered.append(gather_from_tensor_model_parallel_region(logits).float())
            return logits.new_zeros(()), {}

        return output, collect

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=per_chunk_iterators(chunks, batches), model=chunks,
        num_microbatches=len(batches), seq_length=tokens.shape[1], micro_batch_size=micro_batch_size,
        forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = torch.cat(gathered, dim=0)
    return logits[..., :vocab_size] if vocab_size else logits
