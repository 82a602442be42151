"""Token batches for the student and the teacher: prompt+response sequences, right-padded, with the mask
of the positions whose next token is a response token (the positions the loss is taken at), on the run's
device. Sequences are padded to the layout's multiple (2 x CP chunks, x TP under sequence parallelism);
padding sits at the end, where causal attention keeps it from touching any real token.

Micro-batches are a fixed number of sequences, or (`actor.max_tokens_per_micro_batch`) sequences grouped
by length under a token budget, each micro-batch padded only to its own longest sequence."""
from dataclasses import dataclass, replace

import torch

from megatron_opd.parallel.context_parallel import padded_length, split_sequence


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [B, S] prompt + response, right-padded
    labels: torch.Tensor  # [B, S] the next token at each position (pad at the end)
    loss_mask: torch.Tensor  # [B, S] 1.0 where labels[t] is a response token
    position_ids: torch.Tensor  # [B, S] each token's position in its whole sequence
    index: torch.Tensor  # [B] each sequence's row in the step's batch
    lengths: torch.Tensor  # [B] each sequence's length, padding excluded
    on_policy: torch.Tensor  # [B] True where the response is the student's own sample
    engine_logprobs: torch.Tensor  # [B, S] the engine's log-prob of labels[t] where it sampled it, else 0
    reward_advantages: torch.Tensor  # [B] a sample's task reward minus its prompt's mean (0 without reward.fn)
    teacher_index: torch.Tensor  # [B] which of the run's teachers scores the sequence (by its data source)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows, length: int = None) -> "TokenBatch":
        """Rows `rows` (a slice or index tensor), cut to the first `length` positions (default: all)."""
        cut = slice(None, length)
        return TokenBatch(*(self._per_token(lambda t: t[rows, cut])), self.index[rows], self.lengths[rows],
                          self.on_policy[rows], self.engine_logprobs[rows, cut], self.reward_advantages[rows],
                          self.teacher_index[rows])

    def _per_token(self, cut) -> tuple:
        return tuple(cut(t) for t in (self.tokens, self.labels, self.loss_mask, self.position_ids))

    def rows(self, start: int, stop: int) -> "TokenBatch":
        return self.select(slice(start, stop))

    def micro_batches(self, micro_batch_size: int) -> list["TokenBatch"]:
        if self.size % micro_batch_size:
            raise ValueError(f"{self.size} sequences do not split into micro-batches of {micro_batch_size}; "
                             f"make actor.micro_batch_size divide the mini-batch's sequences")
        return [self.rows(i, i + micro_batch_size) for i in range(0, self.size, micro_batch_size)]

    def token_budget_micro_batches(self, max_tokens: int, multiple: int) -> list["TokenBatch"]:
        """The sequences, longest first, in micro-batches whose padded size (sequences x the longest one's
        length, rounded up to `multiple`) stays within `max_tokens`; each cut to its own longest sequence."""
        lengths = self.lengths.tolist()
        order = sorted(range(self.size), key=lambda row: -lengths[row])
        if padded_length(lengths[order[0]], multiple) > max_tokens:
            raise ValueError(f"actor.max_tokens_per_micro_batch={max_tokens} is below a sequence of this step "
                             f"({lengths[order[0]]} tokens, {padded_length(lengths[order[0]], multiple)} padded to "
                             f"the layout's multiple of {multiple}): raise it to at least the longest "
                             f"prompt + response")
        groups, group = [], []
        for row in order:
            longest = padded_length(lengths[group[0]] if group else lengths[row], multiple)
            if group and longest * (len(group) + 1) > max_tokens:
                groups.append(group)
                group = []
            group.append(row)
        groups.append(group)
        return [self.select(torch.tensor(group, device=self.tokens.device),
                            padded_length(lengths[group[0]], multiple)) for group in groups]

    def context_shard(self, cp_rank: int, cp_size: int) -> "TokenBatch":
        """The two sequence chunks CP rank `cp_rank` holds (megatron's load-balanced layout)."""
        tokens, labels, loss_mask, positions = self._per_token(lambda t: split_sequence(t, cp_rank, cp_size))
        return replace(self, tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=positions,
                       engine_logprobs=split_sequence(self.engine_logprobs, cp_rank, cp_size))


def split_micro_batches(batch: TokenBatch, micro_batch_size: int, max_tokens, multiple: int) -> list[TokenBatch]:
    """`actor.max_tokens_per_micro_batch` (max_tokens) when set, else `actor.micro_batch_size` sequences each."""
    if max_tokens:
        return batch.token_budget_micro_batches(max_tokens, multiple)
    return batch.micro_batches(micro_batch_size)


def response_loss_mask(offsets: list[tuple[int, int]], skip: list[tuple[int, int]]) -> list[float]:
    """1.0 for each response token (its character `offsets`) outside every `skip` span, 0.0 for a token that
    overlaps one; a token the tokenizer merged across a span's edge is skipped whole."""
    return [0.0 if any(start < end_skip and begin_skip < end for begin_skip, end_skip in skip) else 1.0
            for start, end in offsets]


def _at_response(prompt: list, response: list, values, length: int, default: float) -> list[float]:
    """Per-response-token `values` (or `default` each) at the positions that predict them: position t predicts
    token t+1, so the response's tokens are predicted from len(prompt) - 1 on; 0 elsewhere."""
    values = list(values) if values is not None else [default] * len(response)
    return [0.0] * (len(prompt) - 1) + values + [0.0] * (length - len(prompt) - len(response) + 1)


def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device,
                multiple: int = 1, on_policy: list[bool] = None, response_masks: list = None,
                engine_logprobs: list = None, reward_advantages: list = None, teacher_index: list = None) -> TokenBatch:
    """`on_policy`: which responses the student sampled (default: all); `response_masks`: per response a 0/1
    list over its tokens (data.response_skip_key), or None to train on every token; `engine_logprobs`: per
    response the engine's log-prob of each token, or None (a given response); `reward_advantages`: per
    response a number (default 0); `teacher_index`: per response its teacher (default 0, the one teacher)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    length = padded_length(max(lengths), multiple)
    tokens, loss_mask, sampled = [], [], []
    nothing = [None] * len(prompts)
    for prompt, response, mask, logprobs in zip(prompts, responses, response_masks or nothing,
                                                engine_logprobs or nothing):
        sequence = list(prompt) + list(response)
        tokens.append(sequence + [pad_id] * (length - len(sequence)))
        loss_mask.append(_at_response(prompt, response, mask, length, 1.0))
        sampled.append(_at_response(prompt, response, logprobs, length, 0.0))
    tokens = torch.tensor(tokens, dtype=torch.long, device=device)
    padding = torch.full((len(prompts), 1), pad_id, dtype=torch.long, device=device)
    labels = torch.cat([tokens[:, 1:], padding], dim=1)
    positions = torch.arange(length, device=device).expand(len(prompts), length)
    return TokenBatch(tokens, labels, torch.tensor(loss_mask, device=device), positions,
                      torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device),
                      torch.tensor([True] * len(prompts) if on_policy is None else on_policy, device=device),
                      torch.tensor(sampled, dtype=torch.float32, device=device),
                      torch.tensor(reward_advantages or [0.0] * len(prompts), dtype=torch.float32, device=device),
                      torch.tensor(teacher_index or [0] * len(prompts), dtype=torch.long, device=device))
