"""Float64 references on gathered (full-vocabulary) logits, and the inputs the multi-rank tests shard."""
import torch


def make_logits(seed, lead, vocab_size, padded_size, dtype=torch.float32, scale=3.0):
    """Student and teacher logits [*lead, padded_size] and a gradient [*lead] for the output. The padding
    columns hold large values, so a loss that fails to exclude them is visibly wrong."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*lead, padded_size, generator=gen, dtype=torch.float64) * scale
    teacher = student + torch.randn(*lead, padded_size, generator=gen, dtype=torch.float64) * scale
    for logits in (student, teacher):
        logits[..., vocab_size:] = 40.0 + torch.rand(*lead, padded_size - vocab_size, generator=gen)
    grad_out = torch.randn(*lead, generator=gen, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype), grad_out.to(torch.float32 if dtype != torch.float64 else dtype)


def vocab_slice(logits, rank, world_size):
    """This rank's shard of the vocabulary (megatron's layout: contiguous equal slices)."""
    size = logits.shape[-1] // world_size
    return logits[..., rank * size:(rank + 1) * size]


def log_softmax(logits, vocab_size, temperature=1.0):
    return torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)


def divergence(student, teacher, kind, beta=0.5, temperature=1.0, vocab_size=None):
    """Per-token divergence in float64, from the definitions (jsd with beta = 0 / 1 is forward / reverse)."""
    vocab_size = vocab_size or student.shape[-1]
    log_s, log_t = log_softmax(student, vocab_size, temperature), log_softmax(teacher, vocab_size, temperature)
    if kind == "forward" or (kind == "jsd" and beta == 0):
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "reverse" or (kind == "jsd" and beta == 1):
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    mix = (beta * log_t.exp() + (1 - beta) * log_s.exp()).log()
    return beta * (log_t.exp() * (log_t - mix)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - mix)).sum(-1)


def value_and_grad(fn, logits, grad_out):
    """fn(logits) in float64 and d <fn, grad_out> / d logits."""
    logits = logits.detach().double().requires_grad_(True)
    out = fn(logits)
    out.backward(grad_out.double())
    return out.detach(), logits.grad


def assert_rel_close(actual, expected, rel, what=""):
    """max |actual - expected| <= rel * max |expected| (a relative error over the whole tensor)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    bound = rel * max(expected.abs().max().item(), 1e-30)
    assert err <= bound, f"{what}: max abs error {err:.3e} > {rel:.0e} x max |expected| = {bound:.3e}"
