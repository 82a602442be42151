"""Megatron-side references for the rollout tests, computed on forked gloo workers: log-probs of given
sequences under a model in some layout, and a deterministic weight change exported as HF tensors."""
import torch

from checkpoint_tools.pretrained import load_pretrained
from checkpoint_tools.weights import export_hf_tensors
from megatron_opd.models.forward import full_logits
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel
from tests.conftest import run_distributed


def token_logprobs(logits: torch.Tensor, sequence: list[int]) -> list[float]:
    """log p(sequence[t] | sequence[:t]) for t >= 1, from logits [s, V]."""
    logprobs = logits.log_softmax(-1)
    return [logprobs[t - 1, token].item() for t, token in enumerate(sequence) if t > 0]


def _perturbed(chunks, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for chunk in chunks for p in chunk.parameters()):
            # Elementwise in the values (plus one scalar shared by all ranks): every layout changes the
            # same full model.
            param.mul_(1.0 + 0.05 * torch.sin(param * 1000.0 + torch.rand((), generator=generator)))


def _worker(rank, world_size, model_dir, parallel, sequences, change_seed):
    from megatron.core import parallel_state

    initialize_model_parallel(parallel)
    arch, chunks = load_pretrained(model_dir, parallel, dtype="float32")
    exported = {}
    if change_seed is not None:
        _perturbed(chunks, change_seed)
        exported = {name: tensor.clone() for name, tensor in export_hf_tensors(chunks, arch)}
    logprobs = []
    for seq in sequences:
        logits = full_logits(chunks, torch.tensor([seq]), vocab_size=arch.vocab_size)
        logprobs.append(token_logprobs(logits[0], seq) if logits is not None else None)
    last_stage = logprobs and logprobs[0] is not None
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return {"logprobs": logprobs if last_stage else None, "tensors": exported}


def megatron_run(model_dir, sequences, parallel=ParallelConfig(), change_seed=None):
    """(log-probs of each sequence, HF tensors after the change or {}) from megatron in `parallel`."""
    results = [r for r in run_distributed(_worker, parallel.min_world_size, model_dir, parallel, sequences,
                                          change_seed) if r is not None]
    logprobs = next(r["logprobs"] for r in results if r["logprobs"] is not None)
    tensors = {}
    for r in results:
        tensors.update(r["tensors"])
    return logprobs, tensors
