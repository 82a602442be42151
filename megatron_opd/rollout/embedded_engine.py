"""The embedded engine: in-process, KV-cached generation with transformers on the student's current
weights (pushed as HF-named tensors, like SGLang's weight sync), on the run's device. The default on a
CPU machine without SGLang; same interface and output fields as the SGLang engine."""
from typing import Iterable, Optional

import torch

from megatron_opd.rollout.engine import RolloutEngine, RolloutError, Sample, SamplingParams, ScoredSequence


class EmbeddedEngine(RolloutEngine):
    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32, max_batch: int = 64,
                 device: torch.device = torch.device("cpu")):
        self.model_path, self.dtype, self.max_batch, self.device = model_path, dtype, max_batch, device
        self.model = None
        self.weight_version = 0

    def start(self) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device).eval()
        config = self.model.generation_config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else min(self.eos_ids, default=0)

    def stop(self) -> None:
        self.model = None

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

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Sample]:
        rows = [list(p) for p in prompts for _ in range(sampling.n)]
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        samples = []
        for start in range(0, len(rows), self.max_batch):
            samples += self._generate_batch(rows[start:start + self.max_batch], sampling)
        return samples

    def _generate_batch(self, rows: list[list[int]], sampling: SamplingParams) -> list[Sample]:
        from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

        width = max(map(len, rows))
        model_vocab = self.model.config.vocab_size
        vocab = min(sampling.vocab_size or model_vocab, model_vocab)
        padding_rows = LogitsProcessorList([SuppressTokensLogitsProcessor(list(range(vocab, model_vocab)), self.device)]
                                           if vocab < model_vocab else [])
        # Left padding: every row's next token is predicted at the same position.
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        greedy = sampling.temperature == 0
        stop_ids = sorted(self.eos_ids | set(sampling.stop_token_ids))
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None if greedy or sampling.top_k < 0 else sampling.top_k,
            eos_token_id=stop_ids or None, pad_token_id=self.pad_id, output_logits=True,
            return_dict_in_generate=True, logits_processor=padding_rows)
        responses = out.sequences[:, width:]
        # Log-probs under the temperature-scaled distribution (SGLang's convention); greedy: unscaled.
        scale = 1.0 if greedy else sampling.temperature
        step_logits = torch.stack(out.logits, dim=1)[..., :vocab]  # [b, steps, V]: the raw logits, tokens only
        step_logprobs = step_logits.float().div(scale).log_softmax(-1)
        picked = step_logprobs.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row, prompt in enumerate(rows):
            tokens = responses[row].tolist()
            length = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
            finish = "stop" if length <= len(tokens) and tokens[length - 1] in stop_ids else "length"
            samples.append(Sample(prompt_ids=prompt, response_ids=tokens[:length],
                                  logprobs=picked[row, :length].tolist(), finish_reason=finish,
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


def make_engine(kind: str, model_path: str, sglang_config=None, dtype: Optional[torch.dtype] = None,
                device: torch.device = torch.device("cpu")) -> RolloutEngine:
    """`rollout.engine`: local (embedded) or sglang, on the run's `device`."""
    if kind == "local":
        return EmbeddedEngine(model_path, dtype=dtype or torch.float32, device=device)
    if kind == "sglang":
        from megatron_opd.rollout.sglang_engine import SGLangEngine
        from megatron_opd.rollout.sglang_server import SGLangConfig

        return SGLangEngine(model_path, sglang_config or SGLangConfig(), device)
    raise ValueError(f"rollout.engine={kind!r}: one of local|sglang")
