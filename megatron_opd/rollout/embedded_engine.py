"""The embedded engine: in-process generation on the student's current weights (pushed as HF-named tensors,
like SGLang's weight sync), on the run's device, with the lean decode loop of `decode_loop` over the
transformers model. The default on a CPU machine without SGLang; same interface and output fields as the
SGLang engine."""
from typing import Iterable, Optional

import torch

from megatron_opd.models import load_arch
from megatron_opd.rollout.decode_loop import DecodeLoop
from megatron_opd.rollout.engine import RolloutEngine, RolloutError, Sample, SamplingParams, ScoredSequence
from megatron_opd.rollout.token_sampler import TokenSampler


class EmbeddedEngine(RolloutEngine):
    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32, max_batch: int = 64,
                 device: torch.device = torch.device("cpu")):
        self.model_path, self.dtype, self.max_batch, self.device = model_path, dtype, max_batch, device
        self.model = None
        self.weight_version = 0

    def start(self) -> None:
        from transformers import AutoModelForCausalLM

        arch = load_arch(self.model_path)  # refuses a family the decode loop does not implement
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device).eval()
        self.decoder = DecodeLoop(self.model, arch)
        config = self.model.generation_config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else min(self.eos_ids, default=0)

    def stop(self) -> None:
        self.model = self.decoder = None

    def healthy(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        seen = set()
        for name, tensor in named_tensors:
            if name not in params:
                raise RolloutError(f"weight sync: {name} is not a parameter of {self.model_path}")
            params[name].copy_(tensor)
            seen.add(name)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing = set(params) - seen - tied
        if missing:
            raise RolloutError(f"weight sync left {len(missing)} parameters unset, e.g. {sorted(missing)[:3]}")
        self.weight_version = version

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Sample]:
        rows = [list(p) for p in prompts for _ in range(sampling.n)]
        generator = None if sampling.seed is None else torch.Generator(device=self.device).manual_seed(sampling.seed)
        samples = []
        for start in range(0, len(rows), self.max_batch):
            samples += self._generate_batch(rows[start:start + self.max_batch], sampling, generator)
        return samples

    def _generate_batch(self, rows: list[list[int]], sampling: SamplingParams,
                        generator: Optional[torch.Generator]) -> list[Sample]:
        if sampling.max_new_tokens == 0:
            return [Sample(prompt_ids=prompt, response_ids=[], logprobs=[], finish_reason="length",
                           weight_version=self.weight_version) for prompt in rows]
        width = max(map(len, rows))
        model_vocab = self.model.config.vocab_size
        vocab = min(sampling.vocab_size or model_vocab, model_vocab)
        # Left padding: every row's next token is predicted at the same position.
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        stop_set = self.eos_ids | set(sampling.stop_token_ids)
        stop_ids = torch.tensor(sorted(stop_set), device=self.device) if stop_set else None
        sampler = TokenSampler(sampling, len(rows), vocab, self.device, generator)
        tokens, logprobs = self.decoder.generate(input_ids, lengths, sampling.max_new_tokens, vocab, sampler, stop_ids)
        samples = []
        for prompt, row_tokens, row_logprobs in zip(rows, tokens.tolist(), logprobs.tolist()):
            length = next((i + 1 for i, t in enumerate(row_tokens) if t in stop_set), None)
            samples.append(Sample(prompt_ids=prompt, response_ids=row_tokens[:length], logprobs=row_logprobs[:length],
                                  finish_reason="length" if length is None else "stop",
                                  weight_version=self.weight_version))
        return samples

    @torch.no_grad()
    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[ScoredSequence]:
        scored = []
        for seq in sequences:
            logprobs = self.model(torch.tensor([seq], device=self.device)).logits[0, :-1].float().log_softmax(-1)
            targets = torch.tensor(seq[1:], device=self.device)[:, None]  # [s-1, 1]
            result = ScoredSequence(token_logprobs=logprobs.gather(-1, targets)[:, 0].tolist())
            if top_k:
                values, ids = logprobs.topk(top_k, dim=-1)
                result.top_ids, result.top_logprobs = ids.tolist(), values.tolist()
            scored.append(result)
        return scored
