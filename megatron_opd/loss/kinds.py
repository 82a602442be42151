"""The divergence kinds `actor.kl_loss_type` names, by what the teacher must provide for them."""
SAMPLED_KINDS = ("kl", "abs", "mse", "low_var_kl")  # estimators on the sampled token's log-probs
FULL_KINDS = ("forward", "reverse", "jsd")  # the whole vocabulary, on TP shards
TOPK_KINDS = ("topk_forward", "topk_reverse")  # the teacher's top-k plus a tail bucket
KL_LOSS_TYPES = SAMPLED_KINDS + FULL_KINDS + TOPK_KINDS
