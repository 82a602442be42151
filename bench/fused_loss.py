"""Peak memory and time of the student's loss path, the output layer fused with the divergence against
the output layer's logits materialised, at T tokens, V = 152k, H = 896 (Qwen2.5-0.5B), TP=1, in one run.

    python bench/fused_loss.py [--tokens 4096 16384 32768] [--vocab 152064 --hidden 896] [--max-gb 20]
    python bench/fused_loss.py --device cuda        # bf16; also against one read of the logits' bytes

Both paths take the student's final hidden states [T, H] and output layer [V, H] (differentiable) and the
teacher as its hidden states and output layer (loss.LinearHead, the trainer's way), and run reverse KL
forward and backward:
  unfused: logits = hidden @ W.T [T, V], then vocab_parallel_divergence; autograd's matmul backward;
  fused:   fused_linear_divergence: logits formed chunk by chunk, again in backward, gradients to hidden and W.
Memory is the peak above the inputs (CPU: peak RSS, bench/peak_memory.py; CUDA: max_memory_allocated);
"added" is that peak minus the [T, H] gradient of the hidden states, which every method returns (the
weight's [V, H] gradient stays in, so a flat "added" means nothing grows with T). Unfused is skipped where
its projected peak passes --max-gb. Time: the minimum of --reps runs after a warm-up.
"""
import argparse
import time

import torch

from megatron_opd.parallel.quiet import quiet_known_messages

quiet_known_messages()

from megatron_opd.loss import LinearHead, fused_linear_divergence, vocab_parallel_divergence  # noqa: E402
from peak_memory import peak_and_seconds  # noqa: E402

# Projected unfused peak in [T, V] tensors of the compute dtype: logits, their gradient, a chunk's work.
UNFUSED_VOCAB_TENSORS = 2.5


def run(method: str, hidden, weight, teacher_hidden, teacher_weight):
    hidden = hidden.detach().requires_grad_(True)
    weight.grad = None
    teacher = LinearHead(teacher_hidden, teacher_weight)
    if method == "fused":
        value = fused_linear_divergence(hidden, weight, teacher_hidden, teacher_weight, "reverse")
    else:
        value = vocab_parallel_divergence(hidden @ weight.T, teacher, "reverse")
    value.sum().backward()
    return hidden.grad


def measure(method: str, tensors, device) -> tuple[float, float]:
    """(peak MiB above the inputs, seconds) of one forward+backward."""
    grad, peak, seconds = peak_and_seconds(lambda: run(method, *tensors), device)
    return peak - grad.numel() * grad.element_size() / 2**20, seconds


def copy_seconds(nbytes: int, device) -> float:
    """One read and one write of `nbytes` on the device (the floor of any pass over the logits)."""
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    target.copy_(source)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=(4096, 16384, 32768))
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--teacher-hidden", type=int, default=896)
    parser.add_argument("--max-gb", type=float, default=20.0)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype) / shape[-1] ** 0.5  # noqa: E731
    weight = draw(args.vocab, args.hidden).requires_grad_(True)
    teacher_weight = draw(args.vocab, args.teacher_hidden)
    print(f"{device.type}, {dtype}, V={args.vocab}, H={args.hidden}, reverse KL, TP=1; MiB above the inputs")
    print(f"{'T':>6} {'method':>8} {'added MiB':>10} {'seconds':>8} {'fused/unfused':>14}")
    for tokens in args.tokens:
        tensors = (draw(tokens, args.hidden), weight, draw(tokens, args.teacher_hidden), teacher_weight)
        run("fused", *(t[:64] if t.shape[0] == tokens else t for t in tensors))  # warm-up
        results = {}
        projected_gb = UNFUSED_VOCAB_TENSORS * tokens * args.vocab * torch.finfo(dtype).bits / 8 / 2**30
        for method in ("unfused", "fused"):
            if method == "unfused" and projected_gb > args.max_gb:
                print(f"{tokens:>6} {method:>8} {'skipped':>10}   (projected {projected_gb:.0f} GB > --max-gb)")
                continue
            runs = [measure(method, tensors, device) for _ in range(args.reps)]
            results[method] = (runs[0][0], min(seconds for _, seconds in runs))
            ratio = f"{results['fused'][1] / results['unfused'][1]:.2f}" if method == "fused" and "unfused" in results else ""
            print(f"{tokens:>6} {method:>8} {results[method][0]:>10.0f} {results[method][1]:>8.2f} {ratio:>14}")
        if device.type == "cuda":
            floor = copy_seconds(tokens * args.vocab * 2, device)
            print(f"{tokens:>6} {'floor':>8} {'':>10} {floor:>8.4f}   one read+write of the bf16 logits")


if __name__ == "__main__":
    main()
