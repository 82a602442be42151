"""Peak memory of the teacher path per token at V = 152k, the old way against the new one, in one run.

    python bench/teacher_memory.py [--vocab 152064 --hidden 3584 --tokens 512 1024 --micro 256]
    python bench/teacher_memory.py --device cuda        # bf16, torch.cuda.max_memory_allocated

One rank at TP=1 (the worst case: nothing shards the vocabulary), a step of T tokens in micro-batches of
--micro tokens. Both methods start from the teacher's final hidden states of the step and its output layer
[V, H] (a 7B teacher's shapes by default), and end with the student's reverse KL and its backward for every
micro-batch (the student's logits, fp32 on CPU, made per micro-batch and dropped after it):
  old: the teacher keeps its logits hidden @ W.T [mb, V] for every micro-batch of the step (what the
       co-located teacher did), and the loss reads them;
  new: the teacher keeps its hidden states [mb, H] (a copy, as the trainer keeps them), and the loss forms
       the logits chunk by chunk from them and W (loss.LinearHead), in forward and again in backward.
Reported: the peak above the inputs (W and the hidden states' source) for each T, and the cost per token of
the step, (peak(T2) - peak(T1)) / (T2 - T1), which is what grows with the step's size. On CPU the peak is
the process's peak RSS (bench/peak_memory.py); on CUDA torch.cuda.max_memory_allocated.
"""
import argparse

import torch

from megatron_opd.parallel.quiet import quiet_known_messages

quiet_known_messages()

from megatron_opd.loss import LinearHead, vocab_parallel_divergence  # noqa: E402
from peak_memory import peak_and_seconds  # noqa: E402

METHODS = ("old", "new")


def step(method: str, hidden: torch.Tensor, weight: torch.Tensor, micro: int, generator) -> None:
    """One step's teacher path: keep the teacher's outputs for every micro-batch, then each loss."""
    pieces = hidden.split(micro)
    kept = [piece @ weight.T if method == "old" else piece.clone() for piece in pieces]
    for teacher in kept:
        student = torch.randn(teacher.shape[0], weight.shape[0], generator=generator, device=hidden.device,
                              dtype=weight.dtype).requires_grad_(True)
        target = teacher if method == "old" else LinearHead(teacher, weight)
        vocab_parallel_divergence(student, target, "reverse").sum().backward()
        del student


def measure(method: str, tokens: int, args, weight: torch.Tensor) -> tuple[float, float]:
    """(peak MiB above the inputs, seconds) of one step of `tokens` tokens."""
    generator = torch.Generator(device=weight.device).manual_seed(tokens)
    hidden = torch.randn(tokens, args.hidden, generator=generator, device=weight.device, dtype=weight.dtype)
    _, peak, seconds = peak_and_seconds(lambda: step(method, hidden, weight, args.micro, generator), weight.device)
    return peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--tokens", type=int, nargs=2, default=(512, 1024))
    parser.add_argument("--micro", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weight = torch.randn(args.vocab, args.hidden, generator=torch.Generator(device=device).manual_seed(0),
                         device=device, dtype=dtype) / args.hidden ** 0.5
    print(f"{device.type}, {dtype}, V={args.vocab}, H={args.hidden}, micro-batches of {args.micro} tokens; "
          f"inputs: W {weight.numel() * weight.element_size() / 2**20:.0f} MiB")
    print(f"{'method':>6} {'T':>6} {'peak MiB':>9} {'seconds':>8}")
    per_token = {}
    for method in METHODS:  # a first step pays one-time costs (thread pools, allocator arenas): unmeasured
        step(method, torch.randn(args.micro, args.hidden, device=device, dtype=dtype), weight, args.micro,
             torch.Generator(device=device).manual_seed(1))
    for method in METHODS:
        peaks = []
        for tokens in args.tokens:
            peak, seconds = measure(method, tokens, args, weight)
            peaks.append(peak)
            print(f"{method:>6} {tokens:>6} {peak:>9.0f} {seconds:>8.1f}")
        per_token[method] = (peaks[1] - peaks[0]) * 2**10 / (args.tokens[1] - args.tokens[0])
    print("\nper token of the step (KiB): " + ", ".join(f"{m} {per_token[m]:.1f}" for m in METHODS)
          + f"; old / new = {per_token['old'] / per_token['new']:.0f}x"
          + f" (the logits row: {args.vocab * weight.element_size() / 2**10:.0f} KiB, the hidden row: "
          + f"{args.hidden * weight.element_size() / 2**10:.1f} KiB)")


if __name__ == "__main__":
    main()
