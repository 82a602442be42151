"""The divergence kinds `actor.kl_loss_type` names, by what the teacher must provide for them: each group is
the kinds its loss module implements."""
from megatron_opd.loss import divergence, sampled, topk

SAMPLED_KINDS = sampled.KINDS  # estimators on the sampled token's log-probs
FULL_KINDS = divergence.KINDS  # the whole vocabulary, on TP shards
TOPK_KINDS = tuple(f"topk_{kind}" for kind in topk.KINDS)  # the teacher's top-k plus a tail bucket
KL_LOSS_TYPES = SAMPLED_KINDS + FULL_KINDS + TOPK_KINDS


def named(kinds) -> str:
    """kinds as an error text writes them: a|b|c."""
    return "|".join(kinds)
