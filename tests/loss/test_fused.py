"""The fused output layer + loss equals the unfused loss on hidden @ weight.T: values (rel 1e-6) and
gradients to the hidden states and the weight (rel 1e-5) for every divergence kind, log-probs (one id and
K ids per token) and entropy, at TP=1 and TP=2 (the hidden states' gradient summed over the TP group as
megatron's column-parallel region does), with an untied output layer and one tied to the embedding that
makes the hidden states, in fp32 and in bf16 (at bf16 tolerances); and it never holds a [T, V] tensor."""
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_opd.loss import (
    fused_linear_divergence, fused_linear_entropy, fused_linear_log_probs, vocab_parallel_divergence,
    vocab_parallel_entropy, vocab_parallel_log_probs)
from tests.conftest import run_distributed
from tests.loss.reference import assert_rel_close

VOCAB, PADDED, HIDDEN, TEACHER_HIDDEN, TOKENS, CHUNK = 37, 40, 16, 24, 6, 4
LOSSES = ("forward", "reverse", "jsd", "log_probs", "topk_log_probs", "entropy")
VALUE_REL, GRAD_REL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}, {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return dict(embedding=(draw(PADDED, HIDDEN) * 0.5).to(dtype), tokens=torch.randint(0, VOCAB, (2, TOKENS), generator=gen),
                mix=(draw(HIDDEN, HIDDEN) * 0.3).to(dtype), output=(draw(PADDED, HIDDEN) * 0.5).to(dtype),
                teacher_hidden=draw(2, TOKENS, TEACHER_HIDDEN).to(dtype), teacher_weight=draw(PADDED, TEACHER_HIDDEN).to(dtype),
                labels=torch.randint(0, VOCAB, (2, TOKENS), generator=gen),
                topk=torch.randint(0, VOCAB, (2, TOKENS, 5), generator=gen), grad=draw(2, TOKENS))


def loss_of(name, fused, hidden, weight, x, rows, group):
    """One loss [2, T] of the hidden states and the weight shard `rows`, fused or on materialised logits."""
    teacher_weight = x["teacher_weight"][rows]
    kwargs = dict(group=group, vocab_size=VOCAB, chunk_size=CHUNK)
    if name in ("forward", "reverse", "jsd"):
        if fused:
            return fused_linear_divergence(hidden, weight, x["teacher_hidden"], teacher_weight, name, 0.3, 0.8, **kwargs)
        return vocab_parallel_divergence(hidden @ weight.T, x["teacher_hidden"] @ teacher_weight.T, name, 0.3, 0.8, **kwargs)
    if name == "entropy":
        return (fused_linear_entropy(hidden, weight, 0.7, **kwargs) if fused
                else vocab_parallel_entropy(hidden @ weight.T, 0.7, **kwargs))
    ids = x["labels"] if name == "log_probs" else x["topk"]
    value = (fused_linear_log_probs(hidden, weight, ids, 0.9, **kwargs) if fused
             else vocab_parallel_log_probs(hidden @ weight.T, ids, 0.9, **kwargs))
    return value if name == "log_probs" else value.sum(-1)


def value_and_grads(name, fused, tied, x, rank=0, world=1, group=None):
    """The loss and the gradients of the embedding and the output-layer shard (one tensor when tied)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    rows = slice(rank * PADDED // world, (rank + 1) * PADDED // world)
    embedding = x["embedding"].clone().requires_grad_(True)
    output = embedding[rows] if tied else x["output"][rows].clone().requires_grad_(True)
    hidden = torch.tanh(embedding[x["tokens"]] @ x["mix"])  # [2, T, H], replicated on the TP ranks
    if world > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    value = loss_of(name, fused, hidden, output, x, rows, group)
    value.backward(x["grad"].to(value.dtype))
    return value.detach().float(), embedding.grad.float(), None if tied else output.grad.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", LOSSES)
def test_fused_equals_unfused_at_tp1(name, tied, dtype):
    x = inputs(dtype)
    fused, unfused = value_and_grads(name, True, tied, x), value_and_grads(name, False, tied, x)
    assert_rel_close(fused[0], unfused[0], VALUE_REL[dtype], f"{name} value")
    for what, got, expected in zip(("embedding grad", "output grad"), fused[1:], unfused[1:]):
        if expected is not None:
            assert_rel_close(got, expected, GRAD_REL[dtype], f"{name} {what}")


def _tp2(rank, world_size, dtype, tied):
    group = dist.new_group([0, 1])
    x = inputs(dtype)
    return {name: value_and_grads(name, True, tied, x, rank, world_size, group) for name in LOSSES}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_at_tp2_equals_unfused_at_tp1(tied):
    ranks = run_distributed(_tp2, 2, torch.float32, tied)
    x = inputs(torch.float32)
    for name in LOSSES:
        value, embedding_grad, output_grad = value_and_grads(name, False, tied, x)
        for rank, results in enumerate(ranks):
            got_value, got_embedding_grad, got_output_grad = results[name]
            assert_rel_close(got_value, value, 1e-6, f"{name} value, rank {rank}")
            if tied:  # each rank's tied weight gets its shard's output gradient plus the embedding's
                continue
            assert_rel_close(got_embedding_grad, embedding_grad, 1e-5, f"{name} embedding grad, rank {rank}")
            rows = slice(rank * PADDED // 2, (rank + 1) * PADDED // 2)
            assert_rel_close(got_output_grad, output_grad[rows], 1e-5, f"{name} output grad, rank {rank}")
        if tied:  # summed over the ranks, the tied weight's gradient is the whole one
            total = sum(results[name][1] for results in ranks) - embedding_grad_from_hidden_only(name, x)
            assert_rel_close(total, embedding_grad, 1e-5, f"{name} tied grad at TP=2")


def embedding_grad_from_hidden_only(name, x):
    """The part of the tied weight's gradient that comes through the hidden states: each TP rank holds it whole
    (the all-reduced hidden gradient), so summing the ranks' gradients counts it once too many."""
    embedding = x["embedding"].clone().requires_grad_(True)
    output = x["embedding"].clone()  # the output layer as a constant: only the hidden path differentiates
    hidden = torch.tanh(embedding[x["tokens"]] @ x["mix"])
    loss_of(name, False, hidden, output, x, slice(0, PADDED), None).backward(x["grad"])
    return embedding.grad


class LargestOutput(TorchDispatchMode):
    """The most elements any op's output had."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("name", LOSSES)
def test_no_op_makes_a_tokens_by_vocabulary_tensor(name):
    """At V = 4096 and 64 tokens in chunks of 8, forward and backward: no op's output (saved, buffer or
    temporary) is as large as [T, V]; the largest are the [V, H] gradient of the weight and [C, V] chunks."""
    gen = torch.Generator().manual_seed(0)
    tokens, vocab, width = 64, 4096, 32
    hidden = torch.randn(tokens, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    calls = {"log_probs": lambda: fused_linear_log_probs(hidden, weight, torch.randint(0, vocab, (tokens,)), chunk_size=8),
             "topk_log_probs": lambda: fused_linear_log_probs(hidden, weight, torch.randint(0, vocab, (tokens, 5)),
                                                              chunk_size=8),
             "entropy": lambda: fused_linear_entropy(hidden, weight, chunk_size=8)}
    teacher_hidden, teacher_weight = torch.randn(tokens, 16, generator=gen), torch.randn(vocab, 16, generator=gen)
    mode = LargestOutput()
    with mode:
        value = calls[name]() if name in calls else fused_linear_divergence(hidden, weight, teacher_hidden,
                                                                            teacher_weight, name, chunk_size=8)
        value.sum().backward()
    assert vocab * width <= mode.largest < tokens * vocab, mode.largest
