"""Token batches for the student and the teacher: prompt+response sequences, right-padded, with the mask
of the positions whose next token is a response token (the positions the loss is taken at)."""
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [B, S] prompt + response, right-padded
    labels: torch.Tensor  # [B, S] the next token at each position (pad at the end)
    loss_mask: torch.Tensor  # [B, S] 1.0 where labels[t] is a response token

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def rows(self, start: int, stop: int) -> "TokenBatch":
        return TokenBatch(self.tokens[start:stop], self.labels[start:stop], self.loss_mask[start:stop])

    def micro_batches(self, micro_batch_size: int) -> list["TokenBatch"]:
        if self.size % micro_batch_size:
            raise ValueError(f"{self.size} sequences do not split into micro-batches of {micro_batch_size}; "
                             f"make actor.micro_batch_size divide the mini-batch's sequences")
        return [self.rows(i, i + micro_batch_size) for i in range(0, self.size, micro_batch_size)]


def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TokenBatch:
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(prompts), length)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = list(prompt) + list(response)
        tokens[row, :len(sequence)] = torch.tensor(sequence)
        # Position t predicts token t+1: the response tokens are predicted from len(prompt)-1 on.
        loss_mask[row, len(prompt) - 1:len(sequence) - 1] = 1.0
    labels = torch.cat([tokens[:, 1:], torch.full((len(prompts), 1), pad_id, dtype=torch.long)], dim=1)
    return TokenBatch(tokens, labels, loss_mask)
