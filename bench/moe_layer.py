"""A mixture-of-experts MLP's forward throughput against a dense MLP with the same active parameters, in one run.

    python bench/moe_layer.py [--hidden 256 --experts 8 --top-k 2 --expert-ffn 128 --tokens 1024 --reps 5]

One process (gloo, CPU), megatron-core's local spec as the trainer builds it (megatron_opd.models.build_model):
a one-layer Qwen3-MoE of --experts experts of FFN size --expert-ffn, top --top-k, dropless, the `allgather`
dispatcher at EP=1; and a one-layer dense Qwen3 of FFN size top-k x expert-ffn, so both MLPs apply the same
number of weights to each token. Timed: the layer's MLP alone (`decoder.layers[0].mlp`) on --tokens tokens,
fp32, the minimum over --reps forwards after one warm-up. Reported: tokens/s of each and MoE / dense.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_opd.parallel.quiet import quiet_known_messages  # noqa: E402

quiet_known_messages()

import torch  # noqa: E402

from megatron_opd.demo.tiny import write_tiny_checkpoint  # noqa: E402
from megatron_opd.models import load_arch  # noqa: E402
from megatron_opd.models.builder import build_model  # noqa: E402
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel  # noqa: E402
from megatron_opd.parallel.local_group import run_local  # noqa: E402


def _tokens_per_s(rank, world_size, paths, tokens, reps):
    initialize_model_parallel(ParallelConfig())
    results = {}
    for name, path in paths.items():
        mlp = build_model(load_arch(path), ParallelConfig())[0].decoder.layers[0].mlp.eval()
        hidden = torch.randn(tokens, 1, mlp.config.hidden_size, generator=torch.Generator().manual_seed(0))
        times = []
        with torch.no_grad():
            for _ in range(reps + 1):
                started = time.perf_counter()
                mlp(hidden)
                times.append(time.perf_counter() - started)
        results[name] = tokens / min(times[1:])
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    shape = dict(hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                 head_dim=args.hidden // 8)
    with tempfile.TemporaryDirectory() as root:
        paths = {"moe": write_tiny_checkpoint(os.path.join(root, "moe"), "qwen3_moe", mlp_only_layers=[],
                                              num_experts=args.experts, num_experts_per_tok=args.top_k,
                                              moe_intermediate_size=args.expert_ffn, **shape),
                 "dense": write_tiny_checkpoint(os.path.join(root, "dense"), "qwen3",
                                                intermediate_size=args.top_k * args.expert_ffn, **shape)}
        # One thread: a forked worker whose parent ran OpenMP work (writing the checkpoints) stalls with more.
        results = run_local(_tokens_per_s, 1, paths, args.tokens, args.reps, timeout_s=900)[0]
    print(f"hidden {args.hidden}, {args.experts} experts of FFN {args.expert_ffn}, top-{args.top_k} vs dense FFN "
          f"{args.top_k * args.expert_ffn}; {args.tokens} tokens, fp32, 1 thread")
    print("| MLP | tokens/s |\n|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} |")
    print(f"MoE / dense: {results['moe'] / results['dense']:.2f}")


if __name__ == "__main__":
    main()
