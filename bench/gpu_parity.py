"""Converted logits equal HF logits on a GPU: the GPU smoke's Qwen2.5-0.5B-shaped student and its Qwen3-MoE
student (random weights, built on the CPU), run by megatron in fp32 on the run's device (the GPU when one is
usable) against transformers in fp32 on the CPU, on the same 2 x 64 random tokens. Also the MoE's routing on
those tokens as transformers computes it: per layer, the busiest expert's tokens over the mean, the figure
the trainer logs as moe/expert_load_max_over_mean. Exit 1 if a max |log-prob difference| exceeds --tolerance.

The CPU suite checks the same conversion at tiny shapes; this is the check at real widths and on GPU kernels
(cuBLAS, megatron's MoE dispatch on CUDA), ~1-2 minutes on an H200. Checkpoints are written from the CPU because
the parent stays off CUDA; on a GPU machine the megatron side runs in a spawned worker all the same.

Run: SCRIPT=bench/gpu_parity.py bash bench/gpu_smoke.sh --out parity.json    (a bare GPU image, as the smoke)
     .venv/bin/python bench/gpu_parity.py --tiny          (the same path on tiny shapes, CPU)
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_smoke import PLANS, write_checkpoint  # noqa: E402  (also quiets megatron's known messages)

from checkpoint_tools.verify import compare, hf_logits, sample_tokens  # noqa: E402
from megatron_opd.demo.tiny import train_tokenizer  # noqa: E402
from megatron_opd.models.forward import full_logits  # noqa: E402
from megatron_opd.parallel import ParallelConfig, initialize_model_parallel  # noqa: E402
from megatron_opd.parallel.local_group import run_local  # noqa: E402

TOKENS = dict(batch=2, seq=64)


def _megatron(rank, world_size, path, tokens):
    from checkpoint_tools.pretrained import load_pretrained

    dims = initialize_model_parallel(ParallelConfig())
    arch, chunks = load_pretrained(path, ParallelConfig(), dtype="float32")
    return full_logits(chunks, tokens.to(dims.device), vocab_size=arch.vocab_size).cpu(), str(dims.device)


@torch.no_grad()
def hf_routing(path: str, tokens: torch.Tensor) -> list:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    ratios = []
    for logits in model(tokens, output_router_logits=True).router_logits:
        load = torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=experts).double()
        ratios.append(round((load.max() / load.mean()).item(), 3))
    return ratios


def check(name: str, fields: dict, family: str, workdir: str, tokenizer) -> dict:
    path = os.path.join(workdir, name)
    started = time.perf_counter()
    params = write_checkpoint(path, fields, 5, tokenizer, "cpu", family=family)
    tokens = sample_tokens(fields["vocab_size"], seed=1, **TOKENS)
    # spawned where CUDA is: a forked worker cannot use it once anything in its parent has touched it
    start = "spawn" if torch.cuda.is_available() else "fork"
    (logits, device), = run_local(_megatron, 1, path, tokens, timeout_s=900, start_method=start)
    parity = compare(hf_logits(path, tokens), logits)
    row = dict(params=params, megatron_device=device, max_abs_logit=parity.max_abs_logit,
               max_abs_logprob=parity.max_abs_logprob, wall_s=time.perf_counter() - started)
    if family == "qwen3_moe":
        row["hf_routing_load_max_over_mean"] = hf_routing(path, tokens)
    routing = row.get("hf_routing_load_max_over_mean")
    routing = f", HF routing max/mean per layer {routing}" if routing else ""
    print(f"{name} ({params / 1e6:.1f}M, megatron on {device}): max|d logit| {parity.max_abs_logit:.3e}, "
          f"max|d log-prob| {parity.max_abs_logprob:.3e}{routing} ({row['wall_s']:.0f} s)", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU check of this path)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="bound on max |log-prob difference|")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    plan = PLANS["tiny" if args.tiny else "qwen2.5"]
    with tempfile.TemporaryDirectory(prefix="opd_parity_") as workdir:
        tokenizer = train_tokenizer()
        report = {"dense": check("student", plan.student, "qwen2", workdir, tokenizer),
                  "moe": check("moe_student", plan.moe_student, "qwen3_moe", workdir, tokenizer),
                  "tolerance": args.tolerance}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    failed = [name for name in ("dense", "moe") if report[name]["max_abs_logprob"] > args.tolerance]
    if failed:
        print(f"parity FAILED for {failed}: max|d log-prob| above {args.tolerance:g}")
        return 1
    print(f"parity passed: both within {args.tolerance:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
