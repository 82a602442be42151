"""Peak memory and time of the full-kind loss against a teacher of another tokenizer (loss/shared_vocab.py: the
shared strings plus one rest bucket, fused) against the same-tokenizer fused divergence, in one run: reverse KL
forward and backward at T tokens, V = 152k, H = 896 (Qwen2.5-0.5B), a share of the student's vocabulary shared.

    python bench/shared_vocab_loss.py [--tokens 2048 8192] [--shared 0.7] [--reps 1]
    python bench/shared_vocab_loss.py --device cuda        # bf16

Both take the student's hidden states [T, H] and output layer [V, H] (differentiable) and the teacher's hidden
states and head on the student's vocabulary [V, H_t]; the cross one also its shared mask and log-masses [T, 2].
Memory is the peak above the inputs (CPU: peak RSS; CUDA: max_memory_allocated) less the [T, H] gradient both
return; the ratio cross/same is what the rest bucket's pre-pass and masks cost. First, on 256 tokens, the cross
loss and its hidden-state gradient on the device against the same inputs in float64 on the CPU (the path the
tests check against whole-logit references): their largest relative difference.
"""
import argparse

import torch

from megatron_opd.parallel.quiet import quiet_known_messages

quiet_known_messages()

from megatron_opd.loss import fused_linear_divergence  # noqa: E402
from megatron_opd.loss.shared_vocab import SharedVocabHead, fused_linear_shared_vocab_divergence  # noqa: E402
from peak_memory import peak_and_seconds  # noqa: E402


def run(method: str, hidden, weight, teacher_hidden, head, masses):
    hidden = hidden.detach().requires_grad_(True)
    weight.grad = None
    if method == "cross":
        value = fused_linear_shared_vocab_divergence(hidden, weight, teacher_hidden, head, masses, "reverse")
    else:
        value = fused_linear_divergence(hidden, weight, teacher_hidden, head.weight, "reverse")
    value.sum().backward()
    return hidden.grad


def device_against_float64(tensors, tokens: int = 256) -> tuple[float, float]:
    """max |device - cpu fp64| / max |cpu fp64| of the cross loss and of its hidden-state gradient."""
    hidden, weight, teacher_hidden, head, masses = tensors
    cut = (hidden[:tokens], weight, teacher_hidden[:tokens], head, masses[:tokens])
    on_cpu = [t.detach().double().cpu() if isinstance(t, torch.Tensor) else t for t in cut]
    on_cpu[3] = SharedVocabHead(head.weight.double().cpu(), head.shared.cpu())
    on_cpu[1] = on_cpu[1].requires_grad_(True)
    found = []
    for inputs in (cut, on_cpu):
        hidden = inputs[0].detach().requires_grad_(True)
        value = fused_linear_shared_vocab_divergence(hidden, inputs[1], inputs[2], inputs[3], inputs[4], "reverse")
        value.sum().backward()
        found.append((value.detach().double().cpu(), hidden.grad.double().cpu()))
    return tuple(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=(2048, 8192))
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--teacher-hidden", type=int, default=896)
    parser.add_argument("--shared", type=float, default=0.7)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype) / shape[-1] ** 0.5  # noqa: E731
    weight = draw(args.vocab, args.hidden).requires_grad_(True)
    head = SharedVocabHead(draw(args.vocab, args.teacher_hidden),
                           torch.rand(args.vocab, generator=gen, device=device) < args.shared)
    print(f"{device.type}, {dtype}, V={args.vocab}, H={args.hidden}, {args.shared:.0%} shared, reverse KL, TP=1; "
          f"MiB above the inputs")
    probe = (draw(256, args.hidden), weight, draw(256, args.teacher_hidden), head,
             torch.stack([torch.full((256,), 12.0, device=device), torch.full((256,), -1.5, device=device)], -1))
    value_rel, grad_rel = device_against_float64(probe)
    print(f"against cpu float64 on 256 tokens: loss rel {value_rel:.1e}, hidden grad rel {grad_rel:.1e}")
    print(f"{'T':>6} {'method':>6} {'added MiB':>10} {'seconds':>8} {'cross/same':>11}")
    for tokens in args.tokens:
        masses = torch.stack([torch.full((tokens,), 12.0, device=device), torch.full((tokens,), -1.5, device=device)], -1)
        tensors = (draw(tokens, args.hidden), weight, draw(tokens, args.teacher_hidden), head, masses)
        run("cross", *(t[:64] if isinstance(t, torch.Tensor) and t.shape[0] == tokens else t for t in tensors))
        results = {}
        for method in ("same", "cross"):
            runs = []
            for _ in range(args.reps):
                grad, peak, seconds = peak_and_seconds(lambda: run(method, *tensors), device)
                runs.append((peak - grad.numel() * grad.element_size() / 2**20, seconds))
            results[method] = (runs[0][0], min(seconds for _, seconds in runs))
            ratio = f"{results['cross'][1] / results['same'][1]:.2f}" if method == "cross" else ""
            print(f"{tokens:>6} {method:>6} {results[method][0]:>10.0f} {results[method][1]:>8.2f} {ratio:>11}")


if __name__ == "__main__":
    main()
