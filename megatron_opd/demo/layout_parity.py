"""The smallest real thing the foundation delivers: a tiny Qwen2-style student and a larger teacher, built
by megatron-core from HF configs, give the same logits sharded over TP=2 as unsharded at TP=1.

Run: .venv/bin/python -m megatron_opd.demo.layout_parity [--out runs/layout_parity]
"""
import argparse
import os
import time

import torch

from megatron_opd.parallel.quiet import quiet_known_messages

quiet_known_messages()

from megatron_opd.models import build_model, load_arch
from megatron_opd.models.forward import full_logits
from megatron_opd.models.sharded_checkpoint import load_model, save_model
from megatron_opd.models.tiny import train_tokenizer, write_tiny_checkpoint
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel
from megatron_opd.parallel.local_group import run_local

MODELS = {"student": dict(hidden_size=64, num_hidden_layers=2), "teacher": dict(hidden_size=128, num_hidden_layers=4,
                                                                                 intermediate_size=256)}


def _logits(rank, world_size, model_dir, ckpt_dir, tensor):
    parallel = ParallelConfig(tensor=tensor)
    initialize_model_parallel(parallel)
    arch = load_arch(model_dir)
    chunks = build_model(arch, parallel)
    if tensor == 1:
        save_model(chunks, ckpt_dir)
    else:
        load_model(chunks, ckpt_dir)
    shard_shape = tuple(chunks[0](torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None],
                                  attention_mask=None).shape)
    tokens = torch.randint(0, arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in chunks[0].parameters())
    return params, shard_shape, full_logits(chunks, tokens, vocab_size=arch.vocab_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/layout_parity")
    args = parser.parse_args()
    tokenizer = train_tokenizer()
    print(f"{'model':8} {'params':>8} {'TP=1 logits':>16} {'TP=2 shard':>14} {'max|Δ|':>10}  result")
    ok = True
    for name, sizes in MODELS.items():
        model_dir = write_tiny_checkpoint(os.path.join(args.out, name), "qwen2", seed=len(name),
                                          tokenizer=tokenizer, **sizes)
        ckpt_dir = os.path.join(args.out, f"{name}_tp1_torch_dist")
        start = time.time()
        (params, _, tp1), = run_local(_logits, 1, model_dir, ckpt_dir, 1, timeout_s=300)
        (_, shard, tp2), _ = run_local(_logits, 2, model_dir, ckpt_dir, 2, timeout_s=300)
        diff = (tp1 - tp2).abs().max().item()
        ok &= diff <= 1e-5
        print(f"{name:8} {params:>8} {str(tuple(tp1.shape)):>16} {str(shard):>14} "
              f"{diff:10.2e}  {'OK' if diff <= 1e-5 else 'MISMATCH'} ({time.time() - start:.1f}s)")
    if not ok:
        raise SystemExit("TP=2 logits differ from TP=1 by more than 1e-5")
    print("TP=2 sharded logits, gathered, equal TP=1 logits for student and teacher (<= 1e-5, fp32).")


if __name__ == "__main__":
    main()
