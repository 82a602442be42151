"""Forward+backward time and peak memory of the vocab-parallel divergence, against two baselines.

    python bench/kl_loss.py [--quick] [--kind reverse] [--max-gb 12] [--reps 3]
    python bench/kl_loss.py --device cuda [--quick]          # bf16 at TP=1, with achieved bytes/s

Methods, on per-rank logits [T, V/TP] (fp32 on CPU, bf16 on CUDA; teacher constant, student differentiable):
  (a) megatron_opd.loss.vocab_parallel_divergence: chunked over tokens, softmaxes recomputed in backward;
  (b) gather the vocabulary (all_gather) + torch log_softmax + F.kl_div on [T, V], autograd;
  (c) unchunked vocab-parallel: sharded log-softmax through autograd-aware all-reduces, probabilities saved.
TP ranks are local gloo processes (megatron_opd.parallel.local_group.run_local) with --threads intra-op
threads each (default 1: in forked workers libgomp with 2 threads made (a)'s many mid-size ops 12x slower
than in a fresh process, while one thread behaves). Times are the minimum over --reps runs after a warm-up.

Memory on CPU is the process's peak RSS above the RSS with the inputs allocated: Linux VmHWM, reset before
each method through /proc/self/clear_refs, in a run with glibc's mmap threshold pinned at 64 KiB so that
every tensor is mapped on allocation and unmapped on free (none hides in the heap). It counts everything
(the returned gradient, autograd buffers, op temporaries, gloo buffers). "workspace" is that peak minus
the gradient of the student shard, which every method must return. The timed runs use a 32 MiB threshold
(and a 64 MiB trim threshold) instead, glibc's own steady state, so that buffers are reused rather than
charged a page fault per 4 KiB on every allocation.
On CUDA: torch.cuda.max_memory_allocated above the inputs.
A method whose projected peak exceeds --max-gb (all ranks together) is skipped and reported as such.
"""
import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_opd.loss import vocab_parallel_divergence
from peak_memory import peak_since, start_measuring
from megatron_opd.parallel.local_group import run_local

GIB = 1 << 30
METHODS = ("a", "b", "c")
# Projected peak per process, in units of one [T, V/TP] fp32 tensor (inputs included), from measured runs
# rounded up; (b) works on the gathered [T, V], i.e. TP such units per tensor.
PROJECTED_UNITS = {"a": lambda tp: 3.5, "b": lambda tp: 2 + 8 * tp, "c": lambda tp: 9.0}


class _GatherVocab(torch.autograd.Function):
    """all_gather along the vocabulary; backward keeps this rank's slice (the loss is replicated)."""

    @staticmethod
    def forward(ctx, shard, group):
        ctx.rank, ctx.size = dist.get_rank(group), shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None


class _AllReduceSum(torch.autograd.Function):
    """all_reduce SUM of a value every rank's loss depends on; backward sums the ranks' gradients."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        total = local.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReplicatedSum(torch.autograd.Function):
    """all_reduce SUM of per-rank partial sums; identity backward (megatron's reduce_from_tp_region)."""

    @staticmethod
    def forward(ctx, partial, group):
        dist.all_reduce(partial, group=group)
        return partial

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _kl(log_s, log_t, kind):  # torch's own KL on log-probs
    if kind == "forward":
        return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)


def gathered_torch(student, teacher, group, kind):
    """(b) [T, V/TP] shards -> full [T, V] on every rank -> torch log_softmax + kl_div."""
    if group is not None:
        student, teacher = _GatherVocab.apply(student, group), _GatherVocab.apply(teacher, group)
    return _kl(torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1), kind)


def unchunked_vocab_parallel(student, teacher, group, kind):
    """(c) sharded log-softmax with autograd through the collectives; autograd saves [T, V/TP] tensors."""
    def log_softmax(logits):
        logits = logits.float()
        max_ = logits.detach().amax(-1, keepdim=True)
        if group is not None:
            dist.all_reduce(max_, op=dist.ReduceOp.MAX, group=group)
        sum_exp = (logits - max_).exp().sum(-1, keepdim=True)
        if group is not None:
            sum_exp = _AllReduceSum.apply(sum_exp, group)
        return logits - max_ - sum_exp.log()
    local = _kl(log_softmax(student), log_softmax(teacher), kind)
    return _ReplicatedSum.apply(local, group) if group is not None else local


def ours(student, teacher, group, kind):
    """(a)"""
    return vocab_parallel_divergence(student, teacher, kind, group=group)


FUNCTIONS = {"a": ours, "b": gathered_torch, "c": unchunked_vocab_parallel}


def _fwd_bwd(fn, student, teacher, group, kind):
    leaf = student.detach().requires_grad_(True)
    value = fn(leaf, teacher, group, kind)
    value.sum().backward()
    return value.detach(), leaf.grad


def _cpu_worker(rank, world_size, vocab, tokens, kind, methods, reps):
    group = dist.new_group(list(range(world_size))) if world_size > 1 else None
    gen = torch.Generator().manual_seed(1000 + rank)
    shard = vocab // world_size
    student = torch.randn(tokens, shard, generator=gen) * 2
    teacher = student + torch.randn(tokens, shard, generator=gen)
    results = {}
    for method in methods:
        fn = FUNCTIONS[method]
        if group is not None:
            dist.barrier(group=group)
        base = start_measuring()
        value, grad = _fwd_bwd(fn, student, teacher, group, kind)
        peak = peak_since(base)
        grad_mib = grad.numel() * grad.element_size() / 2 ** 20
        del grad
        times = []
        for _ in range(reps):
            gc.collect()
            if group is not None:
                dist.barrier(group=group)
            start = time.perf_counter()
            _fwd_bwd(fn, student, teacher, group, kind)
            times.append(time.perf_counter() - start)
        results[method] = dict(time=min(times), peak=peak, workspace=peak - grad_mib, value=value)
    return results


def _cpu_table(args):
    configs = [(32000, 1024, 1), (32000, 1024, 2)] if args.quick else [
        (vocab, tokens, tp) for vocab in (32000, 151936) for tokens in (1024, 4096) for tp in (1, 2)]
    reps = 1 if args.quick else args.reps
    print(f"CPU ({os.cpu_count()} cores), fp32 logits, kind={args.kind}, {args.threads} thread(s) per rank; "
          f"time = min of {reps} runs, memory = peak MiB above the inputs; both max over ranks")
    header = (f"{'V':>7} {'T':>5} {'TP':>2} {'method':>6} {'time s':>8} {'x(b)':>6} {'peak MiB':>9} {'x(b)':>6} "
              f"{'workspace MiB':>13} {'x(b)':>6} {'max|dKL| vs (b)':>15}")
    print(header)
    for vocab, tokens, tp in configs:
        unit_gib = tokens * vocab // tp * 4 / GIB
        methods = [m for m in METHODS if PROJECTED_UNITS[m](tp) * unit_gib * tp <= args.max_gb]
        ranks = run_local(_cpu_worker, tp, vocab, tokens, args.kind, methods, reps, threads=args.threads,
                          timeout_s=3000)
        row = {m: dict(time=max(r[m]["time"] for r in ranks), peak=max(r[m]["peak"] for r in ranks),
                       workspace=max(r[m]["workspace"] for r in ranks), value=ranks[0][m]["value"])
               for m in methods}
        base = row.get("b")
        for method in METHODS:
            if method not in row:
                need = PROJECTED_UNITS[method](tp) * unit_gib * tp
                print(f"{vocab:>7} {tokens:>5} {tp:>2} {'(' + method + ')':>6}  skipped: projected {need:.1f} GiB "
                      f"> --max-gb {args.max_gb}")
                continue
            r = row[method]
            ratio = (lambda key: f"{r[key] / base[key]:6.2f}" if base else f"{'-':>6}")
            diff = f"{(r['value'] - base['value']).abs().max().item():15.2e}" if base else f"{'-':>15}"
            print(f"{vocab:>7} {tokens:>5} {tp:>2} {'(' + method + ')':>6} {r['time']:8.3f} {ratio('time')} "
                  f"{r['peak']:9.0f} {ratio('peak')} {r['workspace']:13.0f} {ratio('workspace')} {diff}",
                  flush=True)


def _copy_bandwidth():
    """Achievable device memory bandwidth: bytes read + written by a 2 GiB copy."""
    src = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * GIB / (start.elapsed_time(end) / 1e3)


def _cuda_table(args):
    configs = [(32000, 1024)] if args.quick else [(v, t) for v in (32000, 151936) for t in (1024, 4096)]
    copy_bw = _copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, bf16 logits, TP=1, kind={args.kind}; copy bandwidth "
          f"{copy_bw / 1e9:.0f} GB/s. 'GB/s' = (2 logit tensors read in forward and again in backward + "
          f"the gradient written) / time")
    print(f"{'V':>7} {'T':>5} {'method':>6} {'time ms':>8} {'x(b)':>6} {'peak MiB':>9} {'x(b)':>6} {'GB/s':>6} "
          f"{'of copy':>7}")
    for vocab, tokens in configs:
        gen = torch.Generator(device="cuda").manual_seed(0)
        student = (torch.randn(tokens, vocab, generator=gen, device="cuda") * 2).bfloat16()
        teacher = (student.float() + torch.randn(tokens, vocab, generator=gen, device="cuda")).bfloat16()
        row = {}
        for method in METHODS:
            fn = FUNCTIONS[method]
            _fwd_bwd(fn, student, teacher, None, args.kind)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.reps):
                _fwd_bwd(fn, student, teacher, None, args.kind)
            end.record()
            torch.cuda.synchronize()
            row[method] = dict(time=start.elapsed_time(end) / 1e3 / args.reps,
                               peak=(torch.cuda.max_memory_allocated() - base) / 2 ** 20)
        moved = 5 * tokens * vocab * student.element_size()
        for method in METHODS:
            r, b = row[method], row["b"]
            print(f"{vocab:>7} {tokens:>5} {'(' + method + ')':>6} {r['time'] * 1e3:8.2f} "
                  f"{r['time'] / b['time']:6.2f} "
                  f"{r['peak']:9.0f} {r['peak'] / b['peak']:6.2f} {moved / r['time'] / 1e9:6.0f} "
                  f"{moved / r['time'] / copy_bw:7.0%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V=32000, T=1024 only, one run")
    parser.add_argument("--kind", default="reverse", choices=("forward", "reverse"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=12.0, help="skip methods projected above this (CPU)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per TP rank (CPU)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.device == "cuda":
        _cuda_table(args)
    else:
        _cpu_table(args)


if __name__ == "__main__":
    main()
