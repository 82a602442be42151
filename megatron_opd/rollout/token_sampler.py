"""One token per row from a step's logits, on tensors: greedy, or a draw from the distribution transformers'
`generate` samples from (temperature, then top-k, then top-p, as its logits processors apply them), with
the log-probability of the token under the temperature-scaled distribution before filtering (SGLang's
convention; greedy: unscaled).

A draw inverts the cumulative distribution at one uniform number per row: the first token whose cumulative
probability exceeds it, a filtered token (probability 0) never. The sum and the number are float64, so even
among 152k tokens a rare one keeps its chance (a float32 sum would round it to a multiple of 6e-8). On a CPU
this is ~30x cheaper at 152k tokens than torch.multinomial or an exponential race, which draw one random
number per token.
"""
from typing import Optional

import torch

from megatron_opd.rollout.engine import SamplingParams


class TokenSampler:
    def __init__(self, sampling: SamplingParams, rows: int, vocab_size: int, device: torch.device,
                 generator: Optional[torch.Generator]):
        self.greedy = sampling.temperature == 0
        self.temperature = sampling.temperature
        self.top_k = sampling.top_k if 0 < sampling.top_k < vocab_size else None
        self.top_p = sampling.top_p if sampling.top_p < 1 else None
        self.generator = generator
        self.uniform = torch.empty(rows, 1, dtype=torch.float64, device=device)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [rows], log-probs [rows]) from fp32 `logits` [rows, vocab], which it may overwrite."""
        if self.greedy:
            tokens = logits.argmax(-1, keepdim=True)
            return tokens[:, 0], logits.log_softmax(-1).gather(-1, tokens)[:, 0]
        logprobs = logits.div_(self.temperature).log_softmax(-1)
        scores, ids = self._candidates(logprobs)
        cumulative = scores.double().exp_().cumsum_(-1)
        threshold = self.uniform.uniform_(generator=self.generator).mul_(cumulative[:, -1:])
        # The product can round up to the total itself: such a draw takes the last token that may be drawn
        # (the candidates are sorted when some are filtered out, so those that may be drawn come first).
        last = torch.isfinite(scores).sum(-1, keepdim=True) - 1
        pick = torch.minimum(torch.searchsorted(cumulative, threshold, right=True), last)
        tokens = pick if ids is None else ids.gather(-1, pick)
        return tokens[:, 0], logprobs.gather(-1, tokens)[:, 0]

    def _candidates(self, logprobs: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probs of the tokens that may be drawn (-inf where filtered out) and their ids (None: all ids)."""
        if self.top_k is None and self.top_p is None:
            return logprobs, None
        if self.top_k is not None:
            scores, ids = logprobs.topk(self.top_k, -1)
        else:
            scores, ids = logprobs.sort(-1, descending=True)
        if self.top_p is not None:
            # Drop a token once the tokens more probable than it already hold top_p of the mass.
            probs = scores.softmax(-1)
            scores = scores.masked_fill(probs.cumsum(-1) - probs >= self.top_p, float("-inf"))
        return scores, ids
