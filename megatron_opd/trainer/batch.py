"""Token batches for the student and the teacher: prompt+response sequences, right-padded, with the mask
of the positions whose next token is a response token (the positions the loss is taken at), on the run's
device. Sequences are padded to the layout's multiple (2 x CP chunks, x TP under sequence parallelism);
padding sits at the end, where causal attention keeps it from touching any real token."""
from dataclasses import dataclass

import torch

from megatron_opd.parallel.context_parallel import padded_length, split_sequence


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [B, S] prompt + response, right-padded
    labels: torch.Tensor  # [B, S] the next token at each position (pad at the end)
    loss_mask: torch.Tensor  # [B, S] 1.0 where labels[t] is a response token
    position_ids: torch.Tensor  # [B, S] each token's position in its whole sequence

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def rows(self, start: int, stop: int) -> "TokenBatch":
        return TokenBatch(self.tokens[start:stop], self.labels[start:stop], self.loss_mask[start:stop],
                          self.position_ids[start:stop])

    def micro_batches(self, micro_batch_size: int) -> list["TokenBatch"]:
        if self.size % micro_batch_size:
            raise ValueError(f"{self.size} sequences do not split into micro-batches of {micro_batch_size}; "
                             f"make actor.micro_batch_size divide the mini-batch's sequences")
        return [self.rows(i, i + micro_batch_size) for i in range(0, self.size, micro_batch_size)]

    def context_shard(self, cp_rank: int, cp_size: int) -> "TokenBatch":
        """The two sequence chunks CP rank `cp_rank` holds (megatron's load-balanced layout)."""
        return TokenBatch(*(split_sequence(t, cp_rank, cp_size)
                            for t in (self.tokens, self.labels, self.loss_mask, self.position_ids)))


def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device,
                multiple: int = 1) -> TokenBatch:
    length = padded_length(max(len(p) + len(r) for p, r in zip(prompts, responses)), multiple)
    tokens, loss_mask = [], []
    for prompt, response in zip(prompts, responses):
        sequence = list(prompt) + list(response)
        tokens.append(sequence + [pad_id] * (length - len(sequence)))
        # Position t predicts token t+1: the response tokens are predicted from len(prompt)-1 on.
        loss_mask.append([0.0] * (len(prompt) - 1) + [1.0] * len(response) + [0.0] * (length - len(sequence) + 1))
    tokens = torch.tensor(tokens, dtype=torch.long, device=device)
    padding = torch.full((len(prompts), 1), pad_id, dtype=torch.long, device=device)
    labels = torch.cat([tokens[:, 1:], padding], dim=1)
    positions = torch.arange(length, device=device).expand(len(prompts), length)
    return TokenBatch(tokens, labels, torch.tensor(loss_mask, device=device), positions)
