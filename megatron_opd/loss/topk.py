"""KL between student and teacher over the teacher's top-k support plus one tail bucket.

The teacher sends, per position, K distinct token ids and their log-probs normalised over the full
vocabulary (e.g. an inference engine's top-k logprobs). Both distributions are coarsened to K + 1 buckets:
the K tokens, and a tail holding the remaining mass 1 - sum_k p[k]. The student's K log-probs are
gathered from its vocab-sharded logits (each rank contributes the ids it owns), so only O(K) scalars per
token cross ranks. Forward = KL(p_t || p_s), reverse = KL(p_s || p_t) over the buckets; a tail that
rounding makes empty is floored at float64's epsilon so that the logs stay finite.
"""
import torch
import torch.distributed as dist

from megatron_opd.loss.logprob import vocab_parallel_log_probs

KINDS = ("forward", "reverse")


def log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    log_mass = log_mass.clamp(max=-torch.finfo(log_mass.dtype).eps)
    return torch.where(log_mass > -0.6931471805599453, torch.log(-torch.expm1(log_mass)),
                       torch.log1p(-torch.exp(log_mass)))


def with_tail_bucket(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., K] log-probs -> [..., K + 1] with the log of the remaining mass appended."""
    tail = log1mexp(torch.logsumexp(topk_logprobs, dim=-1, keepdim=True))
    return torch.cat([topk_logprobs, tail], dim=-1)


def topk_divergence(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor,
                    teacher_topk_logprobs: torch.Tensor, kind: str = "reverse", temperature: float = 1.0,
                    group=None, chunk_size=None, vocab_size=None) -> torch.Tensor:
    """Per-token KL over the teacher's top-k + tail buckets. student_logits [..., V/TP] sharded over
    `group`'s vocabulary (None: megatron's TP group, or one shard); teacher_topk_ids and
    teacher_topk_logprobs [..., K] (global ids, finite log-probs, taken as given: `temperature` divides
    the student's logits only). Returns [...] in fp32 (fp64 for fp64 logits); differentiable w.r.t. the
    student's logits."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"teacher top-k ids {tuple(teacher_topk_ids.shape)} and log-probs "
                         f"{tuple(teacher_topk_logprobs.shape)} must have the same shape [..., K]")
    if teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher top-k ids {tuple(teacher_topk_ids.shape)} must be the student logits' "
                         f"leading shape {tuple(student_logits.shape[:-1])} followed by K")
    student_topk = vocab_parallel_log_probs(student_logits, teacher_topk_ids, temperature=temperature,
                                            group=group, chunk_size=chunk_size, vocab_size=vocab_size)
    return topk_bucket_divergence(student_topk, teacher_topk_logprobs, kind)


def topk_bucket_divergence(student_topk_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                           kind: str = "reverse") -> torch.Tensor:
    """KL over the K + 1 buckets from both sides' log-probs [..., K] of the teacher's top-k ids; differentiable
    w.r.t. the student's. Returns [...] in the student log-probs' dtype."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    # The tail 1 - sum_k p[k] is ill-conditioned when the top-k holds nearly all the mass (a 1e-3 tail
    # loses three digits), so the [..., K + 1] bucket math runs in float64; it is O(K) per token.
    student_buckets = with_tail_bucket(student_topk_logprobs.double())  # [..., K + 1]
    teacher_buckets = with_tail_bucket(teacher_topk_logprobs.detach().double())
    if kind == "forward":
        divergence = (teacher_buckets.exp() * (teacher_buckets - student_buckets)).sum(-1)
    else:
        divergence = (student_buckets.exp() * (student_buckets - teacher_buckets)).sum(-1)
    return divergence.to(student_topk_logprobs.dtype)


def vocab_parallel_topk(logits: torch.Tensor, k: int, vocab_size: int, group) -> torch.Tensor:
    """Global ids [..., K] of the K largest logits of a vocab-sharded [..., V/TP] (K per rank gathered)."""
    shard = logits.shape[-1]
    rank = dist.get_rank(group) if group is not None else 0
    first = rank * shard
    padded = torch.arange(first, first + shard, device=logits.device) >= vocab_size
    values, ids = logits.float().masked_fill(padded, float("-inf")).topk(k, dim=-1)
    ids = ids + first
    if group is not None and dist.get_world_size(group) > 1:
        all_values = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
        all_ids = [torch.empty_like(ids) for _ in range(dist.get_world_size(group))]
        dist.all_gather(all_values, values.contiguous(), group=group)
        dist.all_gather(all_ids, ids.contiguous(), group=group)
        values, ids = torch.cat(all_values, -1), torch.cat(all_ids, -1)
    return ids.gather(-1, values.topk(k, dim=-1).indices)
