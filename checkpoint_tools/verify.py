"""Run the HF model (transformers) and the converted Megatron model on the same tokens and compare."""
from dataclasses import dataclass

import torch

from checkpoint_tools.pretrained import load_pretrained
from megatron_opd.models.forward import full_logits
from megatron_opd.parallel import HOST, ParallelConfig, initialize_model_parallel
from megatron_opd.parallel.local_group import run_local


@dataclass
class Parity:
    max_abs_logit: float
    max_abs_logprob: float

    def within(self, tolerance: float) -> bool:
        return max(self.max_abs_logit, self.max_abs_logprob) <= tolerance


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed), device=HOST)


@torch.no_grad()
def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model(tokens).logits.float()


def _megatron_logits(rank, world_size, path, parallel, tokens):
    dims = initialize_model_parallel(parallel)
    arch, chunks = load_pretrained(path, parallel, dtype="float32")
    logits = full_logits(chunks, tokens.to(dims.device), vocab_size=arch.vocab_size)
    return logits.cpu() if logits is not None and dims.tp_rank == 0 else None


def megatron_logits(path: str, tokens: torch.Tensor, parallel: ParallelConfig, timeout_s: float = 600) -> torch.Tensor:
    """Logits of the model at `path` (HF or converted) run by megatron in `parallel` on local processes (as
    few as the layout needs: data-parallel replicas only where expert parallelism is carved out of them)."""
    results = run_local(_megatron_logits, parallel.min_world_size, path, parallel, tokens, timeout_s=timeout_s)
    return next(r for r in results if r is not None)


def compare(reference: torch.Tensor, other: torch.Tensor) -> Parity:
    return Parity(max_abs_logit=(reference - other).abs().max().item(),
                  max_abs_logprob=(reference.log_softmax(-1) - other.log_softmax(-1)).abs().max().item())


def verify(hf_dir: str, mcore_dir: str, parallel: ParallelConfig) -> Parity:
    from megatron_opd.models import load_arch

    tokens = sample_tokens(load_arch(hf_dir).vocab_size)
    return compare(hf_logits(hf_dir, tokens), megatron_logits(mcore_dir, tokens, parallel))
