"""Distillation losses on vocab-sharded logits: divergences, sampled-token estimators, top-k, log-probs,
entropy, and the trainer's aggregated loss."""
from megatron_opd.loss.distillation import AGG_MODES, ResponseCounts, aggregate, distillation_loss, response_counts
from megatron_opd.loss.divergence import vocab_parallel_divergence
from megatron_opd.loss.fused import fused_linear_divergence, fused_linear_entropy, fused_linear_log_probs
from megatron_opd.loss.logprob import vocab_parallel_entropy, vocab_parallel_log_probs
from megatron_opd.loss.sampled import sampled_token_kl
from megatron_opd.loss.topk import topk_divergence, vocab_parallel_topk
from megatron_opd.loss.vocab_parallel import LinearHead

__all__ = [
    "AGG_MODES", "LinearHead", "ResponseCounts", "aggregate", "distillation_loss", "fused_linear_divergence",
    "fused_linear_entropy", "fused_linear_log_probs", "response_counts", "sampled_token_kl",
    "topk_divergence", "vocab_parallel_divergence", "vocab_parallel_entropy", "vocab_parallel_log_probs",
    "vocab_parallel_topk",
]
