"""What the teacher keeps of a forward pass, per kind of divergence, and how those outputs reach the
student's micro-batches.

  full kinds (forward, reverse, jsd):  its final hidden states [b, s, H_t]; the student's last stage forms
                                       the teacher's logits from them chunk by chunk (loss.LinearHead)
  sampled kinds (kl, abs, mse, ...):   the log-prob of each next token [b, s]
  top-k kinds:                         top-k ids and log-probs [b, s, K]
Never the teacher's logits for the step: per token H_t values at most (3584 for a 7B teacher, against
152064 vocabulary entries).
"""
import torch
import torch.distributed as dist

from megatron_opd.loss import vocab_parallel_log_probs, vocab_parallel_topk
from megatron_opd.loss.kinds import FULL_KINDS, SAMPLED_KINDS
from megatron_opd.parallel.context_parallel import split_sequence
from megatron_opd.parallel.exchange import exchange_rows


@torch.no_grad()
def per_token_values(logits: torch.Tensor, labels: torch.Tensor, kind: str, topk: int, temperature: float,
                     vocab_size: int, group) -> dict:
    """The sampled or top-k kinds' teacher values from its vocab-sharded logits [b, s, V/TP]."""
    if kind in SAMPLED_KINDS:
        return {"logprobs": vocab_parallel_log_probs(logits, labels, temperature, group=group, vocab_size=vocab_size)}
    ids = vocab_parallel_topk(logits / temperature, topk, vocab_size, group)
    return {"topk_ids": ids,
            "topk_logprobs": vocab_parallel_log_probs(logits, ids, temperature, group=group, vocab_size=vocab_size)}


def output_fields(kind: str, topk: int, hidden_size: int, dtype: torch.dtype) -> dict:
    """name -> (trailing shape per token, dtype) of what the teacher keeps for `kind`."""
    if kind in FULL_KINDS:
        return {"hidden": ((hidden_size,), dtype)}
    if kind in SAMPLED_KINDS:
        return {"logprobs": ((), torch.float32)}
    return {"topk_ids": ((topk,), torch.long), "topk_logprobs": ((topk,), torch.float32)}


def bytes_per_token(sent: int, batch, device: torch.device) -> float:
    """Collective: bytes of teacher outputs all ranks sent to others this step, per token of the step."""
    total = torch.tensor([float(sent)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / batch.tokens.numel()


def deliver(held: dict, held_rows, fields: dict, student, student_micro_batches: list, total_rows: int,
            length: int) -> tuple[list, int]:
    """Collective. Outputs of rows [held_rows] (whole sequences of `length` positions, None where this rank
    holds none) to the student ranks that train on them — its last stage, each DP rank its share of the
    step's `total_rows` sequences — then cut like its micro-batches (their rows, their length, their CP
    chunks). Returns (per micro-batch dicts on the student's last stage, [] elsewhere; bytes this rank sent)."""
    rows = total_rows // student.dp_size
    first = student.dp_rank * rows
    wanted = (first, first + rows) if student.is_last_stage else None
    share, sent = {}, 0
    for name, (shape, dtype) in fields.items():
        share[name], moved = exchange_rows(held.get(name), held_rows, wanted, (length, *shape), dtype, student.device)
        sent += moved
    if wanted is None:
        return [], sent
    return [like_micro_batch(share, micro, first, student.cp_rank, student.cp_size) for micro in student_micro_batches], sent


def like_micro_batch(share: dict, micro, first: int, cp_rank: int, cp_size: int) -> dict:
    """A micro-batch's part of outputs for the rows from `first` on: its rows, its length, its CP chunks."""
    rows, length = micro.index - first, micro.tokens.shape[1] * cp_size
    return {name: split_sequence(value[rows, :length], cp_rank, cp_size) for name, value in share.items()}


def whole_rows(kept: list, micro_batches: list, fields: dict, first: int, rows: int, length: int, device) -> dict:
    """Per-micro-batch outputs put back into rows [first, first + rows) of whole sequences, zeros past each
    micro-batch's length (micro-batches may hold any rows, cut to their own length)."""
    whole = {name: torch.zeros((rows, length, *shape), dtype=dtype, device=device)
             for name, (shape, dtype) in fields.items()}
    for outputs, micro in zip(kept, micro_batches):
        for name, value in outputs.items():
            whole[name][micro.index - first, :value.shape[1]] = value
    return whole
