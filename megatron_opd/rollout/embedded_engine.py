"""The embedded engine: in-process generation on the student's current weights (pushed as HF-named tensors,
like SGLang's weight sync), on the run's device, with the lean decode loop of `decode_loop` over the
transformers model. The default on a CPU machine without SGLang; same interface and output fields as the
SGLang engine.

A push names tensors as checkpoints do. transformers 5 keeps a MoE layer's experts as fused 3-D parameters
(`mlp.experts.gate_up_proj` [E, 2I, H]: gate rows then up rows; `mlp.experts.down_proj` [E, H, I]) where
checkpoints, the converters and SGLang name each expert's matrices (`mlp.experts.{e}.gate_proj.weight`,
Mixtral's `block_sparse_moe.experts.{e}.w1.weight`): `_Targets` writes those into their slice of the fused
parameter, and also takes the model's own names.
"""
import re
from typing import Iterable, Optional

import torch

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

        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype).to(self.device).eval()
        self.decoder = DecodeLoop(self.model)  # refuses a family it does not implement
        self.targets = _Targets(self.model)  # after the decode loop has re-pointed the parameters
        config = self.model.generation_config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else min(self.eos_ids, default=0)

    def stop(self) -> None:
        self.model = self.decoder = self.targets = None

    def healthy(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        seen = set()
        for name, tensor in named_tensors:
            target, covers = self.targets.resolve(name)
            if target is None:
                raise RolloutError(f"weight sync: {name} is not a parameter of {self.model_path}")
            if target.shape != tensor.shape:
                raise RolloutError(f"weight sync: {name} has shape {list(tensor.shape)}, the model's is "
                                   f"{list(target.shape)}")
            target.copy_(tensor)
            seen |= covers
        missing = self.targets.required - seen
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


# model_type -> (the checkpoint's name of a sparse layer's MLP module, {an expert's projection in the checkpoint:
# (the fused parameter of `mlp.experts`, which half of its rows: 0 gate, 1 up, None all)}).
_CHECKPOINT_EXPERTS = {
    "qwen3_moe": ("mlp", {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                          "down_proj": ("down_proj", None)}),
    "mixtral": ("block_sparse_moe", {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}),
}
_CHECKPOINT_EXPERTS["qwen2_moe"] = _CHECKPOINT_EXPERTS["qwen3_moe"]
_EXPERT_NAME = re.compile(r"(.+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight")  # layer, module, expert, projection


class _Targets:
    """Where each tensor of a push goes, and which names a complete push covers: every parameter by its
    model name, except fused experts, by their checkpoint names per expert (a push by the fused name covers
    them all). A tied output layer is the embedding's parameter and has no name of its own."""

    def __init__(self, model):
        self.params = dict(model.named_parameters())
        self.module, self.projections = _CHECKPOINT_EXPERTS.get(model.config.model_type, ("mlp", {}))
        self.covers = {name: self._per_expert(name, param) for name, param in self.params.items()}
        self.required = set().union(*self.covers.values())

    def _per_expert(self, name: str, param: torch.Tensor) -> set[str]:
        layer, dot, fused = name.rpartition(".mlp.experts.")
        if not dot:
            return {name}
        return {f"{layer}.{self.module}.experts.{expert}.{projection}.weight"
                for projection, (target, _) in self.projections.items() if target == fused
                for expert in range(param.shape[0])}

    def resolve(self, name: str) -> tuple[Optional[torch.Tensor], set[str]]:
        """(the tensor `name` is written into, the names it covers); (None, empty) for an unknown name."""
        if name in self.params:
            return self.params[name], self.covers[name]
        match = _EXPERT_NAME.fullmatch(name)
        if match and match[2] == self.module and match[4] in self.projections:
            layer, expert, projection = match[1], int(match[3]), match[4]
            fused, half = self.projections[projection]
            param = self.params.get(f"{layer}.mlp.experts.{fused}")
            if param is None or expert >= param.shape[0]:
                return None, set()
            return (param[expert] if half is None else param[expert].chunk(2)[half]), {name}
        renamed = name.replace(f".{self.module}.", ".mlp.")  # Mixtral's router: block_sparse_moe.gate
        if renamed in self.params:
            return self.params[renamed], self.covers[renamed]
        return None, set()
